"""Random-weight Q-Scorer models of any size, built the way the loader builds real ones (for benchmarks).

``random_model(config, dtype, device)`` runs :func:`qscorer.loading.build_model` with a weight source that makes
each tensor on demand: N(0, 0.02) weights, unit norms, zero biases, generated directly in ``dtype`` on ``device``
(never a float32 copy of the whole model: 33 GB at 7B), optionally quantized like ``load_8bit`` / ``load_4bit``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qscorer.loading import build_model
from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM

SCORE_IDS = [32004, 32003, 32002, 32001, 32000]
EVAL_PROMPT_IDS = [1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200, 29871]
EVAL_PROMPT_IDS += [319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338]
"""The batch-evaluation prompt's ids on LLaMA-2 ("USER: How would you rate the quality of this image?\n<|image|>
ASSISTANT: The quality of the image is"), -200 marking the image."""


def _visual(vision: tuple[int, int, int, int], abstractor: tuple[int, int, int, int]) -> dict:
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {
        "visual_model": dict(zip(names, vision)),
        "visual_abstractor": {**dict(zip(names, abstractor)), "encoder_hidden_size": vision[0]},
    }


CONFIGS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        visual_config=_visual((32, 64, 2, 2), (32, 88, 2, 2)),
        deepmlp_hidden_dims=[64, 32],
    ),
    "mid": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        visual_config=_visual((256, 1024, 4, 4), (256, 704, 2, 4)),
        deepmlp_hidden_dims=[512, 256],
    ),
    "7b": {},
}
"""Architectures by name: the tests' tiny one, a mid-size one and the real 7B shapes."""


def config_named(name: str) -> MPLUGOwl2Config:
    """A config of :data:`CONFIGS` with the five score tokens (vocabulary 32005)."""
    return MPLUGOwl2Config(
        vocab_size=32005, score_token_id=SCORE_IDS, score_tokens=[f"<score{i}>" for i in range(1, 6)], **CONFIGS[name]
    )


class RandomWeights:
    """A weight source (see ``qscorer.loading.WeightSources``) whose tensors are generated when read."""

    def __init__(self, config: MPLUGOwl2Config, device: torch.device, seed: int = 0):
        with torch.device("meta"):
            model = MPLUGOwl2LlamaForCausalLM(config)
        self.shapes = {name: tensor.shape for name, tensor in model.named_parameters()}
        self.location = dict.fromkeys(self.shapes)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith(".bias"):
            return torch.zeros(shape, device=self.device)
        if any("norm" in part or part == "ffn_ln" for part in name.split(".")[:-1]):
            return torch.ones(shape, device=self.device)
        return torch.randn(shape, device=self.device, generator=self.generator).mul_(0.02)

    files = ()
    """No files: the load report's bytes read per file stay empty."""

    def where(self, name: str) -> Path:
        return Path("<random>")


def random_model(
    config: MPLUGOwl2Config | str,
    dtype: torch.dtype,
    device: str | torch.device,
    quantization: str | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> MPLUGOwl2LlamaForCausalLM:
    """A random model of ``config`` (or a :data:`CONFIGS` name) in ``dtype`` on ``device``, in eval mode."""
    config = config_named(config) if isinstance(config, str) else config
    config._attn_implementation = attn_implementation
    device = torch.device(device)
    return build_model(config, RandomWeights(config, device, seed), None, dtype, device, quantization)
