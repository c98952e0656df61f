"""LoRA checkpoints in the original's format, and loading them back into a model being trained.

A checkpoint folder holds:

- ``config.json``: the model config with the training fields and ``use_cache`` true;
- ``adapter_config.json``: the LoRA config with exactly the fields peft 0.4.0 wrote (newer peft reads it too);
- ``adapter_model.bin`` (or ``.safetensors``): the LoRA tensors under the original's names,
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (no adapter name, as peft 0.4.0 saved them);
- ``non_lora_trainables.bin`` (or ``.safetensors``): every trainable non-LoRA parameter plus ``embed_tokens`` and
  ``lm_head`` (the current original code's rule), under ``base_model.model.<parameter path>``, in the training dtype.

The original loader and :func:`qscorer.loading.load_pretrained_model` both read it (the original one needs the
``.bin`` files, the default).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from ..checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    ADAPTER_STEM,
    NON_LORA_STEM,
    PEFT_PREFIX,
    checkpoint_key,
    read_state_dict,
    weights_file,
    write_tensors,
)
from ..errors import QScorerError

logger = logging.getLogger(__name__)

ALWAYS_SAVED = ("embed_tokens.weight", "lm_head.weight")
"""Saved even when frozen (the loader restores the grown embeddings from them)."""


def split_state(model, state_dict: dict[str, torch.Tensor] | None = None):
    """``(adapter, non_lora)`` tensors of a PeftModel under the checkpoint names, on CPU.

    ``state_dict`` (e.g. gathered by DeepSpeed) replaces the model's own parameters as the source of the values;
    which non-LoRA tensors are kept is decided from the live model's ``requires_grad`` flags.
    """
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if state_dict is None:
        state_dict = dict(model.named_parameters())
    adapter, non_lora = {}, {}
    for name, tensor in state_dict.items():
        value = tensor.detach().to("cpu", copy=True).contiguous()
        if "lora_" in name:
            adapter[checkpoint_key(name)] = value
        elif name in trainable or name.endswith(ALWAYS_SAVED):
            non_lora[checkpoint_key(name)] = value
    return adapter, non_lora


def adapter_config(model, adapter: dict[str, torch.Tensor]) -> dict:
    """The adapter config with peft 0.4.0's fields; ``target_modules`` lists the adapted modules in model order."""
    config = model.peft_config[ADAPTER_NAME]
    targets = []
    for key in adapter:
        module = key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0]
        if module not in targets:
            targets.append(module)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": config.bias,
        "fan_in_fan_out": config.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": config.init_lora_weights,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }


def save_lora_checkpoint(model, output_dir: str | os.PathLike, *, state_dict=None,
                         safe_serialization: bool = False) -> list[Path]:
    """Write a LoRA checkpoint of a PeftModel into ``output_dir`` (see the module docstring); returns the files."""
    adapter, non_lora = split_state(model, state_dict)
    if not adapter:
        raise QScorerError("the model has no LoRA tensors to save (was it built with --lora_enable True?)")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.get_base_model().config)
    config.use_cache = True
    config.save_pretrained(folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, adapter), indent=2, allow_nan=False) + "\n")
    files = [folder / "config.json", folder / ADAPTER_CONFIG]
    files.append(write_tensors(adapter, folder, ADAPTER_STEM, safe_serialization))
    files.append(write_tensors(non_lora, folder, NON_LORA_STEM, safe_serialization))
    logger.info("saved %d LoRA and %d non-LoRA tensors to %s", len(adapter), len(non_lora), folder)
    return files


def load_lora_checkpoint(model, folder: str | os.PathLike) -> None:
    """Load a LoRA checkpoint (ours or the original's) into a PeftModel with the same LoRA layout.

    Adapter tensors and non-LoRA tensors are matched by their checkpoint names (so the original's full-model
    ``non_lora_trainables.bin`` loads too); a tensor the model does not have, or a LoRA tensor the checkpoint lacks,
    is an error.
    """
    folder = Path(folder)
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    config = model.peft_config[ADAPTER_NAME]
    layout = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or [])}
    if layout != found:
        raise QScorerError(f"{folder / ADAPTER_CONFIG}: LoRA layout {found} differs from the model's {layout}")
    own = model.state_dict()
    by_key = {checkpoint_key(name): name for name in own}
    state, unexpected = {}, []
    for stem in (ADAPTER_STEM, NON_LORA_STEM):
        path = weights_file(folder, stem)
        if path is None:
            raise QScorerError(f"{folder} has no {stem}.safetensors or {stem}.bin")
        for key, tensor in read_state_dict(path).items():
            name = by_key.get(key)
            if name is None:
                unexpected.append(key)
            elif own[name].shape != tensor.shape:
                raise QScorerError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
            else:
                state[name] = tensor
    if unexpected:
        raise QScorerError(f"{folder} has {len(unexpected)} tensors the model does not have, e.g. {unexpected[:3]}")
    missing = sorted(name for name in own if "lora_" in name and name not in state)
    if missing:
        raise QScorerError(f"{folder} lacks LoRA tensors of the model, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), folder)
