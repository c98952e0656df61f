"""The pretrained tiny base of ``qscorer demo``, and the recipe that pretrains it.

Q-Scorer fine-tunes a pretrained MLLM whose vision encoder already sees low-level structure. The demo does the same
at a size a CPU fine-tunes in minutes: it starts from the tiny mPLUG-Owl2 shipped in ``qscorer/assets/demo_base``
(:data:`SHIPPED_BASE`), a base-model folder like ``mplug-owl2-llama2-7b`` (config, safetensors weights, tokenizer,
image-processor config; no score tokens). ``scripts/pretrain_demo_base.py`` rebuilds it with
:func:`pretrain_demo_base`:

1. ``qscorer synth`` on :data:`PRETRAINING_PHOTOS` only, with its own seed (the demo crops the other six photos, so
   the base never saw any of the demo's content);
2. the vision encoder, with a small probe on its mean / std pooled patch features, learns to *describe* each image's
   distortion: which one it is (cross-entropy over :data:`DISTORTIONS`) and how strong (squared error on the
   strength in [0, 1]); never a quality score or level;
3. a tiny mPLUG-Owl2 (:func:`tiny_config`) is initialised at random and takes the pretrained encoder (the probe is
   dropped). The encoder is pretrained on the 112-px images themselves; the model sees them upsampled 4x to 448 px,
   so its 32-px patches cover the same 8 x 8 source pixels and its patch kernel is the pretrained one spread over
   4 x 4 pixels.

32-px patches (14 x 14 = 196 patches) on 4x-upsampled 112-px images line each patch up with one 8 x 8 JPEG block:
measured with the encoder alone, held-out SRCC after 500 steps was 0.43 with 8-px source patches and 0.24 with
7-px ones (JPEG 0.50 vs 0.06).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from .errors import QScorerError

logger = logging.getLogger(__name__)

SHIPPED_BASE = Path(__file__).parent / "assets" / "demo_base"
"""The shipped pretrained tiny base folder."""

PRETRAINING_PHOTOS = ("rocket", "immunohistochemistry", "hubble_deep_field", "coins", "gravel", "stereo_motorcycle")
"""The ``qscorer synth`` photos the base is pretrained on; the demo uses the other six (:func:`demo_photos`)."""

PRETRAINING_SEED = 1000
IMAGE_SIZE = 112
"""Side of the synthetic images, pretraining and demo alike."""
MODEL_IMAGE_SIZE = 448
UPSAMPLING = MODEL_IMAGE_SIZE // IMAGE_SIZE
SOURCE_PATCH = 8
"""Source pixels per patch side: one JPEG block."""
PATCH_SIZE = SOURCE_PATCH * UPSAMPLING

DISTORTIONS = ("blur", "jpeg", "noise", "pixelate")
"""The structural distortions the demo rates. Global brightness and contrast changes are left out: the LayerNorm
after the patch embedding largely normalises them away."""

HEAD_START = 3.0
"""Starting value of the regression head's output bias: the middle of the score scale."""


def demo_photos() -> tuple[str, ...]:
    """The ``qscorer synth`` photos of the demo: all but :data:`PRETRAINING_PHOTOS`."""
    from .data.synthetic import SOURCE_PHOTOS

    return tuple(name for name in SOURCE_PHOTOS if name not in PRETRAINING_PHOTOS)


def tiny_config(vocab_size: int, *, llm_width: int = 64, visual_width: int = 64, patch_size: int = PATCH_SIZE):
    """The tiny architecture: every mPLUG-Owl2 part at 448 px, two layers each, small widths, and 32-px patches
    (14 x 14 = 196 patches; the 7B model has 14-px patches, 1024 of them).

    ``initializer_range`` is width^-0.5 (0.125 at width 64): the 7B model's 0.02 suits width 4096, and at width 64 it
    leaves every residual branch so small that the visual tokens barely depend on the image (measured: 2% spread
    across images at 0.02, 75% at 0.125).
    """
    from .model import MPLUGOwl2Config

    def part(width: int) -> dict:
        return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 4}

    return MPLUGOwl2Config(
        vocab_size=vocab_size,
        hidden_size=llm_width,
        intermediate_size=2 * llm_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=llm_width**-0.5,
        deepmlp_hidden_dims=[llm_width, llm_width // 2],
        visual_config={
            "visual_model": {**part(visual_width), "patch_size": patch_size},
            "visual_abstractor": {
                **part(visual_width),
                "encoder_hidden_size": visual_width,
                "grid_size": MODEL_IMAGE_SIZE // patch_size,
            },
        },
    )


def _load_split(folder: Path, split: str):
    """(CLIP-normalised pixels [N, 3, 112, 112], distortion index [N], strength [N]) of a ``qscorer synth`` split."""
    import torch
    from PIL import Image

    from .model.constants import CLIP_MEAN, CLIP_STD

    records = json.loads((folder / "metas" / f"{split}.json").read_text())
    pixels = np.stack([np.asarray(Image.open(folder / record["image"]).convert("RGB")) for record in records])
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    kinds = torch.tensor([DISTORTIONS.index(record["distortion"]) for record in records])
    strengths = torch.tensor([record["strength"] for record in records], dtype=torch.float32)
    return images, kinds, strengths


class _DescriptionProbe:
    """The vision encoder at 112 px with a probe that predicts the distortion (logits) and its strength."""

    def __init__(self, vision_config, seed: int):
        import torch

        from .model.vision import MplugOwlVisionModel

        class AttentionSettings:
            _attn_implementation = "sdpa"

        torch.manual_seed(seed)
        self.encoder = MplugOwlVisionModel(vision_config, AttentionSettings())
        width = vision_config.hidden_size
        std = width**-0.5
        for module in self.encoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        for parameter in (self.encoder.embeddings.cls_token, self.encoder.embeddings.position_embedding):
            torch.nn.init.normal_(parameter, std=std)
        self.probe = torch.nn.Sequential(
            torch.nn.Linear(2 * width, width), torch.nn.ReLU(), torch.nn.Linear(width, len(DISTORTIONS) + 1)
        )

    def parameters(self) -> list:
        return list(self.encoder.parameters()) + list(self.probe.parameters())

    def __call__(self, images):
        import torch

        patches = self.encoder(images)[:, 1:]
        out = self.probe(torch.cat([patches.mean(1), patches.std(1)], dim=1))
        return out[:, :-1], out[:, -1]


def pretrain_encoder(data: str | Path, *, steps: int, seed: int = PRETRAINING_SEED, learning_rate: float = 1e-3,
                     batch_size: int = 32, visual_width: int = 64):
    """Pretrain the tiny vision encoder on the distortion descriptions of a ``qscorer synth`` folder of 112-px
    images (AdamW, warm-up then cosine, gradient norm clipped at 1); returns the encoder."""
    import torch
    import torch.nn.functional as F

    from .model.configuration import MplugOwlVisionConfig

    images, kinds, strengths = _load_split(Path(data), "train")
    if images.shape[-1] != IMAGE_SIZE:
        raise QScorerError(f"{data}: the pretraining images must be {IMAGE_SIZE} px, not {images.shape[-1]}")
    config = MplugOwlVisionConfig(hidden_size=visual_width, intermediate_size=2 * visual_width, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=SOURCE_PATCH)
    model = _DescriptionProbe(config, seed)
    parameters = model.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, round(0.03 * steps))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        logits, strength = model(images[batch])
        loss = F.cross_entropy(logits, kinds[batch]) + F.mse_loss(strength, strengths[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps:
            logger.info("pretraining step %d/%d: loss %.4f (%.0f s)", step, steps, loss.item(),
                        time.perf_counter() - start)
    return model.encoder


def transplant_encoder(model, encoder) -> None:
    """Copy a 112-px encoder with 8-px patches into ``model``'s 448-px one with 32-px patches: the same weights, the
    patch kernel spread over 4 x 4 pixels (the model sees the 112-px image upsampled 4x)."""
    import torch

    state = dict(encoder.state_dict())
    kernel = state["embeddings.patch_embed.weight"]
    state["embeddings.patch_embed.weight"] = kernel.repeat_interleave(UPSAMPLING, 2).repeat_interleave(
        UPSAMPLING, 3
    ) / (UPSAMPLING * UPSAMPLING)
    target = model.model.vision_model
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QScorerError(f"encoder weights do not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.deepmlp.output_layer.bias.fill_(HEAD_START)


def pretrain_demo_base(output: str | Path, workdir: str | Path, *, num_train: int = 6000, num_test: int = 300,
                       steps: int = 3000, seed: int = PRETRAINING_SEED) -> Path:
    """Build the demo's base into ``output`` (steps 1-3 of the module docstring); ``workdir`` receives the
    pretraining images and the tokenizer. Only the train split is used; ``num_test`` is part of the synth call
    (it moves the train crops), 300 for the shipped base."""
    import torch

    from .data import build_demo_tokenizer, load_tokenizer
    from .data.synthetic import build_synthetic_iqa
    from .model import MPLUGOwl2LlamaForCausalLM
    from .train.setup import save_base_model

    workdir = Path(workdir)
    data = workdir / "pretraining_data"
    build_synthetic_iqa(data, num_train=num_train, num_test=num_test, image_size=IMAGE_SIZE, seed=seed,
                        distortions=DISTORTIONS, photos=PRETRAINING_PHOTOS)
    encoder = pretrain_encoder(data, steps=steps, seed=seed)
    tokenizer = build_demo_tokenizer(workdir / "tokenizer")
    torch.manual_seed(seed)
    model = MPLUGOwl2LlamaForCausalLM(tiny_config(load_tokenizer(tokenizer).vocab_size))
    transplant_encoder(model, encoder)
    return save_base_model(model, output, tokenizer)
