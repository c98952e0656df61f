"""Load Q-Scorer checkpoints: a LoRA folder on a base model, or a merged / full model folder (facts §7.1).

The kind of checkpoint is decided from the files in the folder, never from its name:

- LoRA: ``adapter_config.json`` + ``adapter_model.{bin,safetensors}`` + ``non_lora_trainables.{bin,safetensors}``
  (the original's training output), applied on ``model_base`` (``MAGAer13/mplug-owl2-llama2-7b``).
- full: ``config.json`` + model weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded index), e.g. a
  merged checkpoint.

Pickled ``.bin`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .constants import SCORE_TOKENS
from .errors import QScorerError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_WEIGHTS = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
FULL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PEFT_PREFIX = "base_model.model."
DEFAULT_CONTEXT_LENGTH = 2048

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadReport:
    """What a load did: checkpoint kind, keys the checkpoint lacked or had in excess, merged LoRA modules."""

    kind: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto" (or None) picks cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise QScorerError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from error


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """ "auto" (or None): float32 on CPU, bfloat16 on CUDA when supported (else float16), float16 on MPS."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise QScorerError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_attn_implementation(requested: str | None, device: torch.device) -> str:
    """The attention kernel: sdpa by default; flash_attention_2 only when flash-attn is installed and on CUDA."""
    from .model.flash import is_flash_attn_available

    if requested in (None, "sdpa"):
        return "sdpa"
    if requested == "eager":
        return "eager"
    if requested == "flash_attention_2":
        if device.type == "cuda" and is_flash_attn_available():
            return requested
        logger.warning("flash_attention_2 needs flash-attn and a CUDA device; using sdpa instead")
        return "sdpa"
    raise QScorerError(f"unknown attn_implementation {requested!r}: use sdpa, eager or flash_attention_2")


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def checkpoint_kind(model_path: str | os.PathLike) -> str:
    """ "lora" or "full", from the files in ``model_path``; a QScorerError names what is missing otherwise."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise QScorerError(f"model folder {folder} does not exist (no Hub downloads: pass a local folder)")
    if (folder / ADAPTER_CONFIG).is_file():
        for names in (ADAPTER_WEIGHTS, NON_LORA_WEIGHTS):
            if _first_file(folder, names) is None:
                raise QScorerError(f"LoRA folder {folder} has {ADAPTER_CONFIG} but none of {', '.join(names)}")
        return "lora"
    if (folder / "config.json").is_file() and _first_file(folder, FULL_WEIGHTS) is not None:
        return "full"
    raise QScorerError(
        f"{folder} is neither a LoRA checkpoint ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[1]} + {NON_LORA_WEIGHTS[1]}) "
        f"nor a model folder (config.json + {' or '.join(FULL_WEIGHTS[::2])})"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickled ``.bin`` read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise QScorerError(f"cannot read {path} as a weights-only PyTorch file: {error}") from error


def strip_peft_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PeftModel parameter names -> model names: drop ``base_model.model.`` and peft's ``.base_layer``."""
    renamed = {}
    for key, value in state_dict.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        renamed[name.replace(".base_layer.", ".")] = value
    return renamed


def load_weights_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path, allow_unexpected_keys: bool
) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)`` with readable errors; returns (missing, unexpected) keys."""
    own = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]
    if mismatched:
        raise QScorerError(f"{source}: tensor shapes differ from the model: {'; '.join(mismatched[:5])}")
    unexpected = sorted(key for key in state_dict if key not in own)
    if unexpected and not allow_unexpected_keys:
        raise QScorerError(
            f"{source} has {len(unexpected)} keys the model does not have, e.g. {unexpected[:5]} "
            "(allow_unexpected_keys=True / --allow-unexpected-keys loads the rest anyway)"
        )
    result = model.load_state_dict({key: value for key, value in state_dict.items() if key in own}, strict=False)
    return sorted(result.missing_keys), unexpected


def merge_lora(model: nn.Module, adapter_folder: str | os.PathLike) -> list[str]:
    """Merge a peft LoRA adapter into the model's linear layers: W += scaling * (B @ A), computed in float32.

    Reads ``adapter_config.json`` (r, lora_alpha, use_rslora, fan_in_fan_out) and the adapter weights; plain LoRA
    only (DoRA and per-module rank patterns are refused). Returns the merged module names.
    """
    folder = Path(adapter_folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise QScorerError(f"{folder / ADAPTER_CONFIG}: only plain LoRA adapters can be merged")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise QScorerError(f"{folder / ADAPTER_CONFIG}: per-module rank_pattern / alpha_pattern are not supported")
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    weights_file = _first_file(folder, ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_state_dict(weights_file).items():
        match = _LORA_KEY.match(key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key)
        if match is None:
            raise QScorerError(f"{weights_file}: unexpected adapter tensor {key!r} (only lora_A / lora_B are merged)")
        pairs.setdefault(match["module"], {})[match["part"]] = value

    merged = []
    with torch.no_grad():
        for module_name, parts in sorted(pairs.items()):
            if set(parts) != {"A", "B"}:
                raise QScorerError(f"{weights_file}: {module_name} lacks lora_{'B' if 'A' in parts else 'A'}")
            try:
                layer = model.get_submodule(module_name)
            except AttributeError as error:
                raise QScorerError(f"{weights_file}: the model has no module {module_name!r}") from error
            delta = parts["B"].float() @ parts["A"].float() * scaling
            if config.get("fan_in_fan_out"):
                delta = delta.T
            if not isinstance(layer, nn.Linear) or layer.weight.shape != delta.shape:
                raise QScorerError(f"{weights_file}: {module_name} is not a linear layer of shape {tuple(delta.shape)}")
            layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
            merged.append(module_name)
    return merged


def _tokenizer_folder(preprocessor_path, model_path, model_base) -> Path:
    candidates = [path for path in (preprocessor_path, model_path, model_base) if path is not None]
    for candidate in candidates:
        if (Path(candidate) / "tokenizer_config.json").is_file():
            return Path(candidate)
    raise QScorerError(
        f"no tokenizer_config.json in {', '.join(map(str, candidates))}: pass --preprocessor-path (e.g. the "
        "repository's preprocessor/ folder) or a model folder that has the tokenizer files"
    )


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    preprocessor_path: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    allow_unexpected_keys: bool = False,
):
    """Load a Q-Scorer checkpoint like the original builder; returns ``(tokenizer, model, image_processor,
    context_len)`` and sets ``model.load_report`` (a :class:`LoadReport`).

    ``model_path``: a LoRA folder (then ``model_base`` is the base model folder) or a merged / full model folder.
    ``preprocessor_path``: the tokenizer / image-processor configs (default: the first of preprocessor_path,
    model_path, model_base that has them; ``tokenizer.model`` may come from ``model_base``). Keys in the checkpoint
    that the model does not have are an error unless ``allow_unexpected_keys``. LoRA deltas are merged in float32
    and added to the weights in ``dtype`` (the original merged in float16).
    """
    from .data.image import ImageProcessor
    from .data.tokenization import load_tokenizer, score_token_ids
    from .model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM

    model_path = Path(model_path)
    kind = checkpoint_kind(model_path)
    if kind == "lora" and model_base is None:
        raise QScorerError(f"{model_path} is a LoRA checkpoint: pass the base model folder as model_base")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    attention = resolve_attn_implementation(attn_implementation, torch_device)
    configs_folder = _tokenizer_folder(preprocessor_path, model_path, model_base)
    tokenizer = load_tokenizer(configs_folder, base_model_path=model_base)
    score_ids = score_token_ids(tokenizer)
    report = LoadReport(kind=kind)

    if kind == "lora":
        checkpoint_kind(model_base)
        config = MPLUGOwl2Config.from_pretrained(model_path)
        config.vocab_size = MPLUGOwl2Config.from_pretrained(model_base).vocab_size
        with _quiet_transformers():
            model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(
                model_base, config=config, dtype=torch_dtype, attn_implementation=attention, output_loading_info=True
            )
        _refuse_unexpected(info, model_base, allow_unexpected_keys)
        model.add_score_tokens(score_ids, SCORE_TOKENS)
        non_lora_file = _first_file(model_path, NON_LORA_WEIGHTS)
        non_lora = strip_peft_prefix(read_state_dict(non_lora_file))
        missing, unexpected = load_weights_into(model, non_lora, non_lora_file, allow_unexpected_keys)
        missing_head = [key for key in missing if key.startswith("deepmlp.")]
        if missing_head:
            raise QScorerError(f"{non_lora_file} lacks the regression head ({missing_head[0]}, ...)")
        report.missing_keys, report.unexpected_keys = missing, unexpected
        report.lora_modules = merge_lora(model, model_path)
        logger.info(
            "loaded LoRA checkpoint %s on %s: %d non-LoRA tensors, %d LoRA modules merged",
            model_path,
            model_base,
            len(non_lora),
            len(report.lora_modules),
        )
    else:
        if model_base is not None:
            logger.warning("%s is a full model folder: model_base %s is not used", model_path, model_base)
        model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, attn_implementation=attention, output_loading_info=True
        )
        _refuse_unexpected(info, model_path, allow_unexpected_keys)
        report.missing_keys = sorted(info["missing_keys"])
        report.unexpected_keys = sorted(info["unexpected_keys"])
        if any(key.startswith("deepmlp.") for key in report.missing_keys):
            raise QScorerError(
                f"{model_path} has no Q-Scorer head (deepmlp.*): it looks like a base model; pass it as model_base "
                "together with a LoRA checkpoint as model_path"
            )
        if not model.config.score_token_id:
            model.add_score_tokens(score_ids, SCORE_TOKENS)

    model.to(torch_device).eval()
    model.load_report = report
    image_processor = ImageProcessor.from_pretrained(configs_folder, image_aspect_ratio="pad")
    context_len = getattr(model.config, "max_sequence_length", DEFAULT_CONTEXT_LENGTH)
    return tokenizer, model, image_processor, context_len


@contextmanager
def _quiet_transformers():
    """Silence transformers' load report while loading a base model whose missing head we fill in ourselves."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def _refuse_unexpected(info: dict, source, allow_unexpected_keys: bool) -> None:
    unexpected = sorted(info["unexpected_keys"])
    if unexpected and not allow_unexpected_keys:
        raise QScorerError(
            f"{source} has {len(unexpected)} weights the model does not have, e.g. {unexpected[:5]} "
            "(allow_unexpected_keys=True / --allow-unexpected-keys loads the rest anyway)"
        )
    if unexpected:
        logger.warning("%s: ignored %d unexpected weights, e.g. %s", source, len(unexpected), unexpected[:5])
