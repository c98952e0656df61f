"""Write a synthetic Q-Scorer release with random weights in the published files' exact formats.

    python benchmarks/make_synthetic_release.py OUT [--size 7b|mid|tiny] [--merged] [--tokenizer DIR]

``OUT/base``: like ``MAGAer13/mplug-owl2-llama2-7b``: ``config.json`` (vocab 32000), fp16 weights in
``pytorch_model-0000k-of-0000n.bin`` shards with ``pytorch_model.bin.index.json``, including the 32 (one per layer)
``rotary_emb.inv_freq`` tensors the conversion script wrote, the tokenizer files and ``preprocessor_config.json``.

``OUT/lora``: like ``2kxx/Qscorer_lora_5_1``: ``adapter_config.json`` in peft 0.4.0's form (r 128, alpha 256, the 64
targets ``model.layers.{i}.self_attn.q_proj`` / ``v_proj.multiway.1``), ``adapter_model.bin`` (bf16),
``non_lora_trainables.bin`` with EVERY parameter of the fine-tuned model (vocab 32005, bf16, keys
``base_model.model.<name>``, ~16.4 GB at 7B) and ``config.json`` with the training fields.

``OUT/merged`` (``--merged``): what the original's merge script writes: fp16 ``model-0000k-of-0000n.safetensors``
shards with an index, ``config.json`` with the score-token fields, the tokenizer with the score tokens and
``preprocessor_config.json``.

Weights are N(0, 0.02) (norms 1, biases 0), seeded. Tensors are generated into memory-mapped scratch files, so
writing the 7B release needs little RAM (about 46 GB of disk for base + LoRA, 16 GB more for ``--merged``). The
tokenizer is the LLaMA-2 one (``--tokenizer``, default ``../shared/reference/llama2-tokenizer``). For benchmarks
only; never part of the test data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from qscorer.checkpoints import PEFT_PREFIX, TOKENIZER_FILES
from qscorer.constants import SCORE_TOKENS
from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM
from qscorer.model.image_processing import ImageProcessor

logger = logging.getLogger("make_synthetic_release")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "reference" / "llama2-tokenizer"
SIZES = {
    "7b": {},
    "mid": {
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "visual_config": {
            "visual_model": {"num_hidden_layers": 12},
            "visual_abstractor": {"num_hidden_layers": 6},
        },
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "deepmlp_hidden_dims": [64, 32],
        "visual_config": {
            "visual_model": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            },
            "visual_abstractor": {
                "hidden_size": 32,
                "intermediate_size": 88,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "encoder_hidden_size": 32,
            },
        },
    },
}
"""Architectures: the real 7B shapes, a mid-size one (about 1.4B parameters) and the tests' tiny one."""

LORA_RANK, LORA_ALPHA = 128, 256
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")
BASE_SHARD_BYTES = 5 * 1024**3
MERGED_SHARD_BYTES = 5 * 1000**3
TRAINING_FIELDS = {
    "weight_desp": 1.0,
    "weight_next_token": 0.05,
    "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None,
    "tune_visual_abstractor": True,
    "freeze_vision_model": False,
    "visual_abstractor_lr": None,
    "use_cache": True,
}
"""Fields the original's training writes into the LoRA checkpoint's config.json (train_lora.sh's values)."""


def model_config(size: str, vocab_size: int) -> MPLUGOwl2Config:
    """The config of ``size`` (sub-configs merged into the 7B defaults)."""
    settings = json.loads(json.dumps(SIZES[size]))
    visual = settings.pop("visual_config", None)
    config = MPLUGOwl2Config(vocab_size=vocab_size, **settings)
    if visual:
        for part, values in visual.items():
            config.visual_config[part].update(values)
    return config


def parameter_shapes(config: MPLUGOwl2Config) -> dict[str, torch.Size]:
    """Every parameter (no buffers) of the model, in registration order, from a model on the meta device."""
    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(config)
    return {name: parameter.shape for name, parameter in model.named_parameters()}


class ScratchTensors:
    """Random tensors backed by memory-mapped scratch files (unlinked at once: the disk space lives as long as the
    tensor), so that whole checkpoints can be assembled with little anonymous memory."""

    def __init__(self, folder: Path, seed: int):
        self.folder = folder
        self.generator = torch.Generator().manual_seed(seed)

    def make(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        handle, path = tempfile.mkstemp(dir=self.folder)
        os.close(handle)
        os.truncate(path, max(1, numel * torch.empty((), dtype=dtype).element_size()))
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        os.unlink(path)
        fill = _fill_value(name)
        if fill is not None:
            tensor.fill_(fill)
        else:
            chunk = 1 << 24
            for start in range(0, numel, chunk):
                end = min(numel, start + chunk)
                tensor[start:end] = torch.randn(end - start, generator=self.generator).mul_(0.02)
        return tensor.view(shape)


def _fill_value(name: str) -> float | None:
    """1 for norm weights, 0 for biases, None (random) for the rest."""
    if name.endswith(".bias"):
        return 0.0
    if name.endswith(".weight") and any("norm" in part or part == "ffn_ln" for part in name.split(".")[:-1]):
        return 1.0
    return None


def rotary_inv_freq(config: MPLUGOwl2Config) -> torch.Tensor:
    head_dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def write_base(out: Path, size: str, scratch: ScratchTensors, tokenizer: Path) -> None:
    """fp16 sharded ``.bin`` base model with the rotary extras, config, tokenizer and preprocessor files."""
    config = model_config(size, vocab_size=32000)
    shapes = parameter_shapes(config)
    shapes = {name: shape for name, shape in shapes.items() if not name.startswith("deepmlp.")}
    extras = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": rotary_inv_freq(config)
        for i in range(config.num_hidden_layers)
    }
    shards: list[list[str]] = [[]]
    size_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size_bytes + nbytes > BASE_SHARD_BYTES:
            shards.append([])
            size_bytes = 0
        shards[-1].append(name)
        size_bytes += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(shards, start=1):
        file_name = f"pytorch_model-{index:05d}-of-{len(shards):05d}.bin"
        tensors = {name: scratch.make(name, shapes[name], torch.float16) for name in names}
        for name in names:
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            extra = f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"
            if layer is not None and extra in extras and extra not in weight_map:
                tensors[extra] = extras[extra]
        torch.save(tensors, out / file_name)
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
        logger.info("base: wrote %s (%d tensors)", file_name, len(tensors))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    _copy_tokenizer(tokenizer, out)


def write_lora(out: Path, size: str, scratch: ScratchTensors, base_dir: Path) -> None:
    """The original's LoRA checkpoint: adapter, full-dump non_lora_trainables, configs."""
    config = model_config(size, vocab_size=32000 + len(SCORE_TOKENS))
    shapes = parameter_shapes(config)
    targets = [
        name.removesuffix(".weight")
        for name in shapes
        if name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)) and name.startswith("model.layers.")
    ]
    adapter = {}
    for target in targets:
        out_features, in_features = shapes[f"{target}.weight"]
        adapter[f"{PEFT_PREFIX}{target}.lora_A.weight"] = scratch.make(
            "lora_A", (LORA_RANK, in_features), torch.bfloat16
        )
        adapter[f"{PEFT_PREFIX}{target}.lora_B.weight"] = scratch.make(
            "lora_B", (out_features, LORA_RANK), torch.bfloat16
        )
    torch.save(adapter, out / "adapter_model.bin")
    adapter_config = {
        "auto_mapping": None,
        "base_model_name_or_path": str(base_dir),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_RANK,
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    non_lora = {f"{PEFT_PREFIX}{name}": scratch.make(name, shape, torch.bfloat16) for name, shape in shapes.items()}
    torch.save(non_lora, out / "non_lora_trainables.bin")
    logger.info("lora: wrote %d adapter and %d non-LoRA tensors", len(adapter), len(non_lora))
    saved = config.to_dict()
    saved.update(TRAINING_FIELDS)
    saved.update({"score_token_id": [], "score_tokens": [], "torch_dtype": "bfloat16"})
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")


def write_merged(out: Path, size: str, scratch: ScratchTensors, tokenizer: Path) -> None:
    """The merge script's output: fp16 safetensors shards, index, config with score tokens, tokenizer files."""
    from safetensors.torch import save_file

    from qscorer.data.tokenization import load_tokenizer, save_tokenizer

    ids = list(range(32000, 32000 + len(SCORE_TOKENS)))
    config = model_config(size, vocab_size=32000 + len(SCORE_TOKENS))
    config.score_token_id, config.score_tokens = list(reversed(ids)), list(SCORE_TOKENS)
    shapes = parameter_shapes(config)
    names = list(shapes)
    shards: list[list[str]] = [[]]
    size_bytes = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * 2
        if shards[-1] and size_bytes + nbytes > MERGED_SHARD_BYTES:
            shards.append([])
            size_bytes = 0
        shards[-1].append(name)
        size_bytes += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: scratch.make(name, shapes[name], torch.float16) for name in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
        del tensors
        logger.info("merged: wrote %s", file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    save_tokenizer(load_tokenizer(tokenizer), out)
    ImageProcessor().save_pretrained(out)


def _copy_tokenizer(tokenizer: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, out / name)
    ImageProcessor().save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created; must not exist)")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--merged", action="store_true", help="also write a merged checkpoint folder")
    parser.add_argument("--no-lora", action="store_true", help="skip the base and LoRA folders")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="LLaMA-2 tokenizer folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.tokenizer / "tokenizer.model").is_file():
        parser.error(f"--tokenizer {args.tokenizer} has no tokenizer.model (a LLaMA-2 tokenizer folder is needed)")
    if args.out.exists():
        parser.error(f"{args.out} exists")
    scratch_dir = args.out / ".scratch"
    scratch_dir.mkdir(parents=True)
    scratch = ScratchTensors(scratch_dir, args.seed)
    if not args.no_lora:
        for part in ("base", "lora"):
            (args.out / part).mkdir()
        write_base(args.out / "base", args.size, scratch, args.tokenizer)
        write_lora(args.out / "lora", args.size, scratch, args.out / "base")
    if args.merged:
        (args.out / "merged").mkdir()
        write_merged(args.out / "merged", args.size, scratch, args.tokenizer)
    scratch_dir.rmdir()
    print(json.dumps({part.name: sum(f.stat().st_size for f in part.iterdir()) for part in sorted(args.out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
