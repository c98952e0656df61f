"""Export a merged model as a self-contained folder (the original's scripts/merge_lora_save.py; ``qscorer merge``).

The folder holds safetensors weights, ``config.json`` (with ``score_token_id``, ``score_tokens``,
``deepmlp_hidden_dims`` and an ``auto_map``), the tokenizer with the score tokens, ``preprocessor_config.json``,
``score_prompts.json`` (the scoring prompts' token ids) and the modeling code, so that plain transformers loads it
without qscorer installed::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.score([Image.open("photo.jpg")])

The LoRA delta is merged in float32 and the result cast to ``--torch-dtype`` once (the original merged in float16).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from .errors import QScorerError

logger = logging.getLogger(__name__)

MODEL_PACKAGE = Path(__file__).resolve().parent / "model"
"""The remote code: every module of ``qscorer.model`` but its ``__init__``, copied unchanged (they import only each
other, by relative imports, and torch / transformers / numpy / PIL)."""

AUTO_MAP = {
    "AutoConfig": "configuration.MPLUGOwl2Config",
    "AutoModelForCausalLM": "modeling.MPLUGOwl2LlamaForCausalLM",
}


def write_remote_code(output_dir: str | Path) -> list[Path]:
    """Copy the model package's modules (all but its ``__init__``) into ``output_dir``; returns the written paths."""
    modules = sorted(path for path in MODEL_PACKAGE.glob("*.py") if path.name != "__init__.py")
    return [Path(shutil.copy2(path, Path(output_dir) / path.name)) for path in modules]


MODEL_CARD = """---
library_name: transformers
tags:
- image-quality-assessment
- q-scorer
---
# Q-Scorer (merged)

A Q-Scorer image-quality model (mPLUG-Owl2 + score-token regression head) with its LoRA merged, exported by
qscorer. It loads with plain transformers:

```python
from PIL import Image
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
print(model.score([Image.open("photo.jpg")]))  # list of floats, about 1 (bad) .. 5 (excellent)
```
"""


def export_model(
    model,
    tokenizer,
    image_processor,
    output_dir: str | Path,
    *,
    dtype: torch.dtype,
    remote_code: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a loaded (merged) model as a self-contained folder in ``dtype``.

    The folder is written under a temporary name next to ``output_dir`` and renamed at the end, so a failed export
    leaves no half-written model behind. ``output_dir`` must be absent or empty.
    """
    from .data.conversation import score_processor
    from .data.tokenization import save_tokenizer

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise QScorerError(f"output folder {output} is not empty")
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.to(dtype)
        config = model.config
        config.vocab_size = model.get_input_embeddings().num_embeddings
        config._name_or_path = ""
        if remote_code:
            config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, partial)
        score_processor(tokenizer, image_processor).save_pretrained(partial)
        if remote_code:
            write_remote_code(partial)
        (partial / "README.md").write_text(MODEL_CARD.replace("{folder}", str(output)), encoding="utf-8")
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported %s (%s)", output, str(dtype).removeprefix("torch."))
    return output
