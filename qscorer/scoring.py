"""Score images with a Q-Scorer checkpoint: the ``Scorer`` Python API (``qscorer score`` runs it).

Each image is scored with one prefill and one KV-cached step (``MPLUGOwl2LlamaForCausalLM.predict_scores``), which
gives the numbers of the original's two full forward passes. The prompt is the original's batch-evaluation prompt
by default (``prompt="eval"``, the one behind the published results); ``prompt="scorer"`` is the prompt of the
original scorer.py and ``model.score()``. Scores are clamped to [0, 5] by default, like ``model.score()``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .constants import SCORE_TOKENS_REPORT_ORDER
from .errors import QScorerError
from .model.configuration import SCORE_RANGE

logger = logging.getLogger(__name__)


@dataclass
class ImageScore:
    """One image's result; ``error`` is set (and the rest None) when the image could not be read or scored."""

    image: str
    score: float | None = None
    logits: dict[str, float] | None = None
    probs: dict[str, float] | None = None
    token_id: int | None = None
    error: str | None = None


class ImageSourceDataset(Dataset):
    """Paths, PIL images or pixel tensors [3, 448, 448] -> (index, pixels or None, error or None).

    Paths are decoded and preprocessed here, i.e. in DataLoader workers when ``num_workers`` > 0; a file that
    cannot be read yields its error message instead of pixels.
    """

    def __init__(self, sources: Sequence):
        self.sources = list(sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        from .model.image_processing import load_image, process_images

        source = self.sources[index]
        if isinstance(source, torch.Tensor):
            return index, source, None
        try:
            image = source if isinstance(source, Image.Image) else load_image(source)
            return index, process_images([image])[0], None
        except QScorerError as error:
            return index, None, str(error)


def collate_sources(items):
    """Keep indices, stack the decoded pixels, and pass errors through."""
    indices = [index for index, _, _ in items]
    pixels = [pixels for _, pixels, _ in items if pixels is not None]
    errors = {index: error for index, _, error in items if error is not None}
    return indices, (torch.stack(pixels) if pixels else None), errors


def source_name(source, index: int) -> str:
    """A path as given, or a placeholder naming the position of an in-memory image."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"


class Scorer:
    """Quality scores from a Q-Scorer checkpoint.

    >>> scorer = Scorer("checkpoints/Qscorer_lora_5_1", model_base="mplug-owl2-llama2-7b")
    >>> scorer(["a.jpg", "b.png"])        # list of floats
    >>> scorer.score(["a.jpg"])[0].logits  # {"<score5>": ..., ..., "<score1>": ...}
    >>> scorer.score_tensor(pixels)        # differentiable [B] tensor, for metrics / losses / rewards

    Inputs: paths, PIL images, or pixel tensors ([3, 448, 448] or [B, 3, 448, 448], as from
    ``qscorer.data.process_images``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        model_base: str | os.PathLike | None = None,
        preprocessor_path: str | os.PathLike | None = None,
        *,
        prompt: str = "eval",
        clamp: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        **load_options,
    ):
        """Load a checkpoint (folders or Hub ids; none: the published Q-Scorer) and prepare the scoring prompt.

        ``load_options`` are the keyword options of :func:`qscorer.loading.load_pretrained_model`: ``device``,
        ``dtype``, ``attn_implementation``, ``allow_unexpected_keys``, ``load_8bit``, ``load_4bit``, ``revision``,
        ``base_revision``.
        """
        from .loading import load_pretrained_model

        tokenizer, model, _, _ = load_pretrained_model(model_path, model_base, preprocessor_path, **load_options)
        self._setup(model, tokenizer, prompt, clamp, batch_size, num_workers)

    @classmethod
    def from_model(
        cls, model, tokenizer, *, prompt: str = "eval", clamp: bool = True, batch_size: int = 8, num_workers: int = 0
    ) -> Scorer:
        """A scorer around an already loaded model and tokenizer (e.g. right after training)."""
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, prompt, clamp, batch_size, num_workers)
        return scorer

    def _setup(self, model, tokenizer, prompt: str, clamp: bool, batch_size: int, num_workers: int) -> None:
        from .data.conversation import SCORING_PROMPT_KINDS, scoring_prompt_ids

        if prompt not in SCORING_PROMPT_KINDS:
            raise QScorerError(f"unknown prompt {prompt!r}: choose one of {list(SCORING_PROMPT_KINDS)}")
        if batch_size < 1:
            raise QScorerError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.prompt, self.clamp = prompt, clamp
        self.batch_size, self.num_workers = batch_size, num_workers
        self.prompt_ids = torch.tensor(scoring_prompt_ids(tokenizer, prompt), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, pixel_values: torch.Tensor):
        """``ScorePrediction`` for a pixel batch [B, 3, 448, 448], without gradients."""
        with torch.inference_mode():
            return self._predict(pixel_values)

    def _predict(self, pixel_values: torch.Tensor):
        pixel_values = pixel_values.to(self.device)
        input_ids = self.prompt_ids.to(self.device).expand(pixel_values.shape[0], -1)
        return self.model.predict_scores(input_ids, pixel_values)

    def score_tensor(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Differentiable scores [B] of a pixel batch (autograd graph kept; clamped if ``clamp``).

        Gradients reach ``pixel_values`` through the vision encoder, abstractor, LLM and head; use it as a metric,
        a loss or a reward. The chosen continuation token (an argmax) is not differentiated.
        """
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        scores = self._predict(pixel_values).scores.float()
        return scores.clamp(*SCORE_RANGE) if self.clamp else scores

    def __call__(self, images) -> list[float]:
        """Scores of one image or a list of images; an unreadable image raises ``QScorerError``."""
        results = self.score(images)
        failed = [result for result in results if result.error]
        if failed:
            raise QScorerError(failed[0].error)
        return [result.score for result in results]

    def score(self, images, *, progress: bool = False) -> list[ImageScore]:
        """Per-image results (score, the five score-token logits and probabilities, the appended token).

        Images that cannot be read (or score as NaN / infinity) get an ``ImageScore`` with ``error`` set; the others
        are still scored.
        """
        sources = _as_list(images)
        results: list[ImageScore | None] = [None] * len(sources)
        for indices, pixels, errors in tqdm(self.loader(sources), desc="scoring", unit="batch", disable=not progress):
            for error in errors.values():
                logger.error("%s", error)
            names = [source_name(sources[index], index) for index in indices]
            for index, result in zip(indices, self.batch_results(names, pixels, [errors.get(i) for i in indices])):
                results[index] = result
        return results

    def loader(self, sources: Sequence) -> DataLoader:
        """Batches ``(indices, pixels of the readable images, {index: error})`` of paths, PIL images or pixel
        tensors, decoded in ``num_workers`` DataLoader workers."""
        dataset = ImageSourceDataset(sources)
        return DataLoader(dataset, self.batch_size, num_workers=self.num_workers, collate_fn=collate_sources)

    def batch_results(self, names: Sequence[str], pixels: torch.Tensor | None, errors: Sequence) -> list[ImageScore]:
        """The ``ImageScore`` of each image of a batch: one whose ``errors`` entry is set fails with it, the others
        (``pixels``, in order) are scored together."""
        results = [ImageScore(image=name, error=error) for name, error in zip(names, errors)]
        good = [row for row, error in enumerate(errors) if error is None]
        if good:
            prediction = self.predict(pixels)
            for position, row in enumerate(good):
                results[row] = self.image_score(names[row], prediction, position)
        return results

    def image_score(self, name: str, prediction, row: int) -> ImageScore:
        """The ``ImageScore`` of row ``row`` of a ``predict`` result (clamped if ``clamp``).

        A score, logit or probability that is NaN or infinite (a broken checkpoint, an overflow in float16) makes it
        a failure naming the image: no non-finite number is ever reported or written.
        """
        score = float(prediction.scores[row].float())
        logits = prediction.score_token_logits[row].tolist()
        probs = prediction.score_token_probs[row].tolist()
        non_finite = _first_non_finite(score, logits, probs)
        if non_finite is not None:
            return ImageScore(
                image=name,
                error=f"{name}: the model gave a non-finite {non_finite}; check the checkpoint and the dtype",
            )
        if self.clamp:
            score = min(max(score, SCORE_RANGE[0]), SCORE_RANGE[1])
        return ImageScore(
            image=name,
            score=score,
            logits=dict(zip(SCORE_TOKENS_REPORT_ORDER, logits)),
            probs=dict(zip(SCORE_TOKENS_REPORT_ORDER, probs)),
            token_id=int(prediction.token_ids[row]),
        )


def _first_non_finite(score: float, logits: list[float], probs: list[float]) -> str | None:
    """ "<what> (<value>)" for the first NaN or infinite number of a result, or None when all are finite."""
    named = [
        ("score", score),
        *(("score-token logit", value) for value in logits),
        *(("score-token probability", value) for value in probs),
    ]
    return next((f"{what} ({value})" for what, value in named if not math.isfinite(value)), None)


def score_with_two_full_passes(model, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """The original procedure, kept as the reference for checks and benchmarks: a full forward picks
    the argmax token after the prompt; a second full forward (vision encoder and abstractor again) of the prompt
    plus that token gives the head's input. Returns (appended token ids, scores, score-token logits, hidden)."""
    with torch.no_grad():
        first = model(input_ids=input_ids, images=pixel_values, use_cache=False)
        appended = first.logits[:, -1].argmax(-1)
        extended = torch.cat([input_ids, appended[:, None]], dim=1)
        second = model(input_ids=extended, images=pixel_values, use_cache=False)
        hidden = second.last_hidden_state[:, -1]
        score_ids = torch.tensor(model.config.score_token_id, device=hidden.device)
        return appended, model.deepmlp(hidden), second.logits[:, -1][:, score_ids], hidden


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)
