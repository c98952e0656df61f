"""Tiny random mPLUG-Owl2 configs for tests: real 448-px image path, LLM width 64, two layers everywhere."""

from __future__ import annotations

import torch

from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM

SCORE_IDS = [32000, 32001, 32002, 32003, 32004]


def tiny_config(**overrides) -> MPLUGOwl2Config:
    """LLM 64 wide / 4 heads / 2 layers; vision 32 wide / 2 layers at 448 px; abstractor 32 wide / 2 layers."""
    visual_config = {
        "visual_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "visual_abstractor": {
            "hidden_size": 32,
            "intermediate_size": 88,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
        },
    }
    settings = dict(
        vocab_size=32005,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        visual_config=visual_config,
        deepmlp_hidden_dims=[64, 32],
        score_token_id=list(reversed(SCORE_IDS)),
        score_tokens=[f"<score{level}>" for level in range(1, 6)],
    )
    settings.update(overrides)
    return MPLUGOwl2Config(**settings)


def tiny_model(seed: int = 0, **overrides) -> MPLUGOwl2LlamaForCausalLM:
    """A randomly initialised tiny model in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    return MPLUGOwl2LlamaForCausalLM(tiny_config(**overrides)).eval()


def save_tiny_checkpoint(folder, seed: int = 0, **overrides):
    """A merged-format tiny checkpoint (weights, config, demo tokenizer, image-processor config) in ``folder``."""
    from pathlib import Path

    from qscorer.data import build_demo_tokenizer, load_tokenizer, save_tokenizer
    from qscorer.data.demo_tokenizer import DEMO_VOCAB_SIZE
    from qscorer.model.image_processing import ImageProcessor

    folder = Path(folder)
    tokenizer = load_tokenizer(build_demo_tokenizer(folder / "_tokenizer"))
    ids = list(range(DEMO_VOCAB_SIZE, DEMO_VOCAB_SIZE + 5))
    settings = dict(vocab_size=DEMO_VOCAB_SIZE + 5, score_token_id=list(reversed(ids)))
    settings.update(overrides)
    model = tiny_model(seed, **settings)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    ImageProcessor().save_pretrained(folder)
    return folder
