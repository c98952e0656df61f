"""Load Q-Scorer checkpoints like the original builder, lean enough for the 7B release on the machines users have.

``load_pretrained_model`` takes a LoRA checkpoint on a base model (the published ``2kxx/Qscorer_lora_5_1`` on
``MAGAer13/mplug-owl2-llama2-7b``, the default), or a merged / full model folder; each location is a local folder
or a Hub id. The checkpoint kind is read from the files (:mod:`qscorer.checkpoints`).

How the model is built: its modules are created on the meta device (no memory), then every weight is read once,
lazily (memory-mapped), from the one file that provides it, and written straight into the target dtype and
device. For a LoRA checkpoint ``non_lora_trainables`` wins over the base (the published one holds every
parameter, so the base's weights are then never read), and the LoRA delta ``scaling * B @ A`` is added in float32
to the weight it adapts before the cast (the original merged in float16). With ``load_8bit`` / ``load_4bit`` the
LLM's linear layers are quantized right after (:mod:`qscorer.quantization`). Peak memory is therefore about the
model's size in the target dtype, plus one layer.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    CONFIG_FILE,
    NON_LORA_STEM,
    TensorFile,
    checkpoint_kind,
    lora_module_and_part,
    model_key,
    model_weight_files,
    read_state_dict,
    weights_file,
)
from .constants import SCORE_TOKENS
from .errors import QScorerError

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 2048
IGNORED_CHECKPOINT_KEYS = (".rotary_emb.inv_freq",)
"""Keys the base model's conversion script wrote that the model recomputes (rotary frequencies)."""
GROWN_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
"""Weights whose rows may be fewer in the checkpoint than in the model: a base model without the five score tokens.
The missing rows start at the mean of the existing rows (the original did so for ``lm_head``)."""
POSITION_TABLES = ("q_pos_embed", "k_pos_embed")
"""The abstractor's fixed sin-cos buffers: loaded when a checkpoint has them, computed otherwise."""

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
    """What a load did: the checkpoint kind and folders, keys the checkpoint lacked (only the abstractor's
    position tables, which are computed), weights ignored, merged LoRA modules, the quantization mode and the bytes
    read per file."""

    kind: str
    model_folder: str = ""
    base_folder: str | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    quantization: str | None = None
    bytes_read: dict[str, int] = field(default_factory=dict)


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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, quantized: bool = False) -> torch.dtype:
    """ "auto" (or None): float32 on CPU, bfloat16 on CUDA when supported (else float16), float16 on MPS. With
    quantization, "auto" is the compute dtype: float16 on CUDA (the original's), bfloat16 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if quantized:
            return torch.float16 if device.type == "cuda" else torch.bfloat16
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise QScorerError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_attn_implementation(requested: str | None, device: torch.device) -> str:
    """The attention kernel: sdpa by default; flash_attention_2 only when flash-attn is installed and on CUDA."""
    from .model.flash import is_flash_attn_available

    if requested in (None, "sdpa", "eager"):
        return requested or "sdpa"
    if requested == "flash_attention_2":
        if device.type == "cuda" and is_flash_attn_available():
            return requested
        logger.warning("flash_attention_2 needs flash-attn and a CUDA device; using sdpa instead")
        return "sdpa"
    raise QScorerError(f"unknown attn_implementation {requested!r}: use sdpa, eager or flash_attention_2")


class WeightSources:
    """Model key -> the one file that provides it. Files are searched in priority order (a LoRA checkpoint's
    ``non_lora_trainables`` before the base model's shards); a key found in an earlier file is never read from a
    later one."""

    def __init__(self, paths: list[Path]):
        self.files = [TensorFile(path) for path in paths]
        self.location: dict[str, tuple[TensorFile, str]] = {}
        for file in self.files:
            for key in file:
                self.location.setdefault(model_key(key), (file, key))

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def read(self, name: str) -> torch.Tensor:
        file, key = self.location[name]
        return file[key]

    def where(self, name: str) -> Path:
        return self.location[name][0].path


@dataclass
class LoraAdapter:
    """The LoRA tensors of a checkpoint, by adapted module: ``delta(module)`` = scaling * B @ A in float32."""

    path: Path
    scaling: float
    fan_in_fan_out: bool
    pairs: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def read(cls, folder: Path) -> LoraAdapter:
        """Read ``adapter_config.json`` (r, lora_alpha, use_rslora, fan_in_fan_out) and the adapter weights; plain
        LoRA only (DoRA and per-module rank patterns are refused)."""
        config_path = folder / ADAPTER_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            rank, alpha = int(config["r"]), float(config["lora_alpha"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise QScorerError(f"{config_path} is not a LoRA config with r and lora_alpha: {error}") from None
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            raise QScorerError(f"{config_path}: only plain LoRA adapters can be merged")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise QScorerError(f"{config_path}: per-module rank_pattern / alpha_pattern are not supported")
        path = weights_file(folder, ADAPTER_STEM)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in read_state_dict(path).items():
            parsed = lora_module_and_part(key)
            if parsed is None:
                raise QScorerError(f"{path}: unexpected adapter tensor {key!r} (only lora_A / lora_B are merged)")
            pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
        for module, parts in pairs.items():
            if set(parts) != {"A", "B"}:
                raise QScorerError(f"{path}: {module} lacks lora_{'B' if 'A' in parts else 'A'}")
            if parts["B"].shape[1] != parts["A"].shape[0]:
                raise QScorerError(
                    f"{path}: {module} has lora_A {tuple(parts['A'].shape)} but lora_B {tuple(parts['B'].shape)}"
                )
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return cls(path, scaling, bool(config.get("fan_in_fan_out")), pairs)

    def check(self, model: nn.Module) -> None:
        """Every adapted module exists in the model and is a linear layer of the adapter's shape."""
        for module_name, parts in sorted(self.pairs.items()):
            try:
                layer = model.get_submodule(module_name)
            except AttributeError:
                raise QScorerError(f"{self.path}: the model has no module {module_name!r}") from None
            shape = (parts["B"].shape[0], parts["A"].shape[1])
            if self.fan_in_fan_out:
                shape = shape[::-1]
            if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape:
                found = tuple(layer.weight.shape) if isinstance(layer, nn.Linear) else type(layer).__name__
                raise QScorerError(
                    f"{self.path}: {module_name} is {found} in the model, the adapter needs {shape} "
                    "(an adapter for another base model?)"
                )

    def delta(self, module_name: str, device: torch.device) -> torch.Tensor | None:
        parts = self.pairs.get(module_name)
        if parts is None:
            return None
        delta = parts["B"].to(device, torch.float32) @ parts["A"].to(device, torch.float32) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


def load_pretrained_model(
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    preprocessor_path: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    allow_unexpected_keys: bool = False,
    load_8bit: bool = False,
    load_4bit: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
):
    """Load a Q-Scorer checkpoint like the original builder; returns ``(tokenizer, model, image_processor,
    context_len)`` and sets ``model.load_report`` (a :class:`LoadReport`).

    ``model_path``: a LoRA checkpoint (then ``model_base`` is its base model) or a merged / full model; a folder or
    a Hub id (``revision`` / ``base_revision`` pick a branch, tag or commit). Without both, the published
    ``2kxx/Qscorer_lora_5_1`` on ``MAGAer13/mplug-owl2-llama2-7b``. ``preprocessor_path``: the tokenizer /
    image-processor configs (default: the first of preprocessor_path, model_path, model_base that has them;
    ``tokenizer.model`` may come from the base). Weights the model does not have are an error unless
    ``allow_unexpected_keys``. ``load_8bit`` / ``load_4bit`` quantize the LLM's linear layers (bitsandbytes).
    """
    from .hub import PUBLISHED_BASE, PUBLISHED_MODEL, locate
    from .quantization import quantization_mode

    if model_path is None:
        if model_base is not None:
            raise QScorerError("model_base was given without model_path: pass the LoRA checkpoint as model_path")
        model_path, model_base = PUBLISHED_MODEL, PUBLISHED_BASE
        logger.info("no model given: using the published %s on %s", model_path, model_base)
    quantization = quantization_mode(load_8bit, load_4bit)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, quantized=quantization is not None)
    attention = resolve_attn_implementation(attn_implementation, torch_device)

    model_folder = locate(model_path, revision)
    kind = checkpoint_kind(model_folder)
    base_folder = None
    if kind == "lora":
        if model_base is None:
            raise QScorerError(
                f"{model_path} is a LoRA checkpoint: pass its base model as model_base / --model-base "
                f"(the published LoRA's base is {PUBLISHED_BASE})"
            )
        base_folder = locate(model_base, base_revision)
        if checkpoint_kind(base_folder) != "full":
            raise QScorerError(f"model_base {model_base} is a LoRA checkpoint, not a model folder")
    elif model_base is not None:
        logger.warning("%s is a full model folder: model_base %s is not used", model_path, model_base)

    from .data.tokenization import load_tokenizer, score_token_ids
    from .model.image_processing import ImageProcessor

    configs_folder = _tokenizer_folder(preprocessor_path, model_folder, base_folder)
    tokenizer = load_tokenizer(configs_folder, base_model_path=base_folder)
    config = _model_config(model_folder, kind, score_token_ids(tokenizer))
    config._attn_implementation = attention
    config._name_or_path = str(base_folder if kind == "lora" else model_folder)

    if kind == "lora":
        sources = WeightSources([weights_file(model_folder, NON_LORA_STEM), *model_weight_files(base_folder)])
        adapter = LoraAdapter.read(model_folder)
    else:
        sources = WeightSources(model_weight_files(model_folder))
        adapter = None
    model = build_model(config, sources, adapter, torch_dtype, torch_device, quantization, allow_unexpected_keys)
    report = model.load_report
    report.kind, report.model_folder = kind, str(model_folder)
    report.base_folder = None if base_folder is None else str(base_folder)
    logger.info(
        "loaded %s checkpoint %s%s (%s, %s%s): %.2f GB read",
        kind,
        model_path,
        f" on {model_base}" if kind == "lora" else "",
        str(torch_dtype).removeprefix("torch."),
        torch_device,
        f", {quantization}" if quantization else "",
        sum(report.bytes_read.values()) / 1e9,
    )
    image_processor = ImageProcessor.from_pretrained(configs_folder, image_aspect_ratio="pad")
    context_len = getattr(model.config, "max_sequence_length", DEFAULT_CONTEXT_LENGTH)
    return tokenizer, model, image_processor, context_len


def _model_config(folder: Path, kind: str, score_ids: list[int]):
    """The checkpoint's config with the score tokens: a LoRA checkpoint's config (the original wrote none of the
    score-token fields) always gets the tokenizer's; a full model keeps its own if it has them."""
    from .model import MPLUGOwl2Config

    try:
        config = MPLUGOwl2Config.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise QScorerError(f"cannot read {folder / CONFIG_FILE}: {error}") from None
    if kind == "lora" or not config.score_token_id:
        config.vocab_size = max(config.vocab_size, max(score_ids) + 1)
        config.score_token_id = list(reversed(score_ids))
        config.score_tokens = list(SCORE_TOKENS)
    return config


def build_model(
    config,
    sources: WeightSources,
    adapter: LoraAdapter | None,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    allow_unexpected_keys: bool = False,
):
    """An ``MPLUGOwl2LlamaForCausalLM`` of ``config`` whose weights come from ``sources`` (each read once, straight
    into ``dtype`` on ``device``), with ``adapter`` merged and the LLM's linear layers quantized if asked. The model
    is in eval mode and carries a :class:`LoadReport` as ``load_report``."""
    from .model import MPLUGOwl2LlamaForCausalLM

    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(config)
    if adapter is not None:
        adapter.check(model)
    expected = set(model.state_dict())
    unexpected = sorted(
        name for name in sources.location if name not in expected and not name.endswith(IGNORED_CHECKPOINT_KEYS)
    )
    if unexpected and not allow_unexpected_keys:
        files = sorted({sources.where(name).name for name in unexpected})
        raise QScorerError(
            f"{', '.join(files)}: {len(unexpected)} weights the model does not have, e.g. {unexpected[:5]} "
            "(allow_unexpected_keys=True / --allow-unexpected-keys loads the rest anyway)"
        )
    if unexpected:
        logger.warning("ignored %d unexpected weights, e.g. %s", len(unexpected), unexpected[:5])
    missing = sorted(
        name for name in expected if name not in sources and name.rsplit(".", 1)[-1] not in POSITION_TABLES
    )
    if missing:
        head = [name for name in missing if name.startswith("deepmlp.")]
        if head:
            raise QScorerError(
                "the checkpoint has no Q-Scorer head (deepmlp.*): a base model must be given as model_base, "
                "together with a LoRA checkpoint as model_path"
            )
        raise QScorerError(f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:5]}")

    from .quantization import is_quantized, limit_heap_fragmentation, quantized_linear

    if quantization is not None and device.type == "cpu":
        limit_heap_fragmentation()
    computed_keys: list[str] = []
    with torch.no_grad():
        for module_name, module in list(model.named_modules()):
            if quantization is not None and is_quantized(module_name, module):
                weight = _final_tensor(
                    f"{module_name}.weight", module.weight.shape, sources, adapter, torch.float32, device
                )
                bias = None if module.bias is None else sources.read(f"{module_name}.bias")
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, quantized_linear(weight, bias, quantization, dtype, device))
                continue
            for name, parameter in list(module.named_parameters(recurse=False)):
                key = f"{module_name}.{name}" if module_name else name
                tensor = _final_tensor(key, parameter.shape, sources, adapter, dtype, device)
                module._parameters[name] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
            computed = []
            for name, buffer in list(module.named_buffers(recurse=False)):
                key = f"{module_name}.{name}" if module_name else name
                if key in sources:
                    module._buffers[name] = _final_tensor(key, buffer.shape, sources, None, dtype, device)
                else:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=dtype, device=device)
                    computed.append(name)
            if computed:
                module.reset_position_tables(computed)
                computed_keys += [f"{module_name}.{name}" for name in computed]
    model.eval()
    model.load_report = LoadReport(
        kind="",
        missing_keys=computed_keys,
        unexpected_keys=unexpected,
        lora_modules=sorted(adapter.pairs) if adapter is not None else [],
        quantization=quantization,
        bytes_read={str(file.path): file.bytes_read for file in sources.files},
    )
    return model


def _final_tensor(
    name: str,
    shape: torch.Size,
    sources: WeightSources,
    adapter: LoraAdapter | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The weight ``name`` as the model needs it: read, rows grown for the score tokens, LoRA delta added in
    float32, then in ``dtype`` on ``device``."""
    stored = sources.read(name)
    delta = adapter.delta(name.removesuffix(".weight"), device) if adapter is not None else None
    if stored.shape != shape:
        if name in GROWN_ROWS and stored.dim() == 2 and stored.shape[1] == shape[1] and stored.shape[0] < shape[0]:
            stored = torch.cat(
                [stored.float(), stored.float().mean(dim=0, keepdim=True).expand(shape[0] - stored.shape[0], -1)]
            )
        else:
            raise QScorerError(
                f"{sources.where(name)}: {name} has shape {tuple(stored.shape)}, the model {tuple(shape)} "
                "(a checkpoint for another model size?)"
            )
    if delta is None:
        return stored.to(device=device, dtype=dtype)
    return (stored.to(device=device, dtype=torch.float32) + delta).to(dtype)


def _tokenizer_folder(preprocessor_path, model_folder: Path, base_folder: Path | None) -> Path:
    candidates = [Path(path) for path in (preprocessor_path, model_folder, base_folder) if path is not None]
    for candidate in candidates:
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise QScorerError(
        f"no tokenizer_config.json in {', '.join(map(str, candidates))}: pass --preprocessor-path (e.g. the "
        "repository's preprocessor/ folder) or a model folder that has the tokenizer files"
    )
