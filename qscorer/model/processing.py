"""What :meth:`~qscorer.model.modeling.MPLUGOwl2LlamaForCausalLM.score` needs besides the model: the token ids of
the scoring prompts and the image preprocessing, in one object that saves to and loads from a model folder.

The prompt ids are computed once by the text pipeline (``qscorer.data.conversation.score_processor``) and stored in
``score_prompts.json``, so a folder written by ``qscorer merge`` scores with plain transformers: no tokenizer
templates are needed at scoring time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import QScorerError
from .image_processing import ImageProcessor

SCORE_PROMPTS_FILE = "score_prompts.json"


class ScoreProcessor:
    """Images -> (prompt ids [B, L], pixel values [B, 3, 448, 448]) for one of the stored scoring prompts.

    ``prompt_ids`` maps a prompt name ("eval", "scorer", "training") to its ids, with -200 where the image goes.
    """

    def __init__(self, prompt_ids: Mapping[str, Sequence[int]], image_processor: ImageProcessor | None = None):
        self.prompt_ids = {name: [int(i) for i in ids] for name, ids in prompt_ids.items()}
        self.image_processor = ImageProcessor() if image_processor is None else image_processor

    def __call__(self, images, prompt: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self.prompt_ids:
            raise QScorerError(f"unknown prompt {prompt!r}: choose one of {sorted(self.prompt_ids)}")
        pixels = self.image_processor(images)
        ids = torch.tensor(self.prompt_ids[prompt], dtype=torch.long)
        return ids.expand(pixels.shape[0], -1), pixels

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ScoreProcessor:
        """Read ``score_prompts.json`` and the image-processor config of a model folder."""
        path = Path(folder) / SCORE_PROMPTS_FILE
        try:
            prompt_ids = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QScorerError(
                f"{path} is absent (qscorer merge writes it): pass processor=qscorer.data.score_processor(tokenizer)"
            ) from None
        except (OSError, json.JSONDecodeError) as error:
            raise QScorerError(f"cannot read {path}: {error}") from None
        return cls(prompt_ids, ImageProcessor.from_pretrained(folder))

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write ``score_prompts.json`` and ``preprocessor_config.json`` into ``folder``."""
        path = Path(folder) / SCORE_PROMPTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.prompt_ids, allow_nan=False) + "\n", encoding="utf-8")
        return [str(path), *self.image_processor.save_pretrained(folder)]
