"""The pretrained tiny base of ``qscorer demo``, and the recipe that pretrains it.

Q-Scorer fine-tunes a pretrained MLLM whose vision encoder already sees low-level structure. The demo does the same
at a size a CPU fine-tunes in minutes: it starts from the tiny mPLUG-Owl2 shipped in ``qscorer/assets/demo_base``
(:data:`SHIPPED_BASE`), a base-model folder like ``mplug-owl2-llama2-7b`` (config, safetensors weights, tokenizer,
image-processor config; no score tokens). ``scripts/pretrain_demo_base.py`` rebuilds it with
:func:`pretrain_demo_base`:

1. pretraining images: ``qscorer synth`` crops of all twelve bundled photos with the base's own seed, kept out of the
   four corners of every photo (``train_outside_corners``), where any ``qscorer synth`` build, the demo's included,
   takes its held-out crops; and distorted textured dead-leaves images (:func:`dead_leaves`), whose content never
   repeats, so that what the encoder learns is the distortion rather than the photo;
2. the vision encoder, with a small probe on its mean / std pooled patch features, learns to *describe* each image's
   distortion: which one it is (cross-entropy over :data:`DISTORTIONS`) and how strong (squared error on the
   strength in [0, 1]); never a quality score or level;
3. a tiny mPLUG-Owl2 (:func:`tiny_config`) is initialised at random and takes the pretrained encoder (the probe is
   dropped). The model sees each 112-px image upsampled 4x to 448 px, so its 32-px patches cover the same 8 x 8
   source pixels; its patch kernel is the pretrained one spread over 4 x 4 pixels, and the encoder was pretrained on
   the model's own preprocessing of the images average-pooled 4 x 4 (:func:`_model_view`), which makes the two
   exactly equivalent.

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

DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "grass", "brick")
"""The ``qscorer synth`` photos of the demo's data."""

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


def _model_view(pixels: np.ndarray):
    """What the tiny model's encoder sees of 112-px images (uint8 [N, 112, 112, 3]), at 112 px: the model's own
    preprocessing (bicubic upsampling to 448 px, CLIP normalisation) average-pooled 4 x 4 [N, 3, 112, 112]. The
    transplanted 32-px patch kernel on the 448-px pixels equals the pretrained 8-px one on these, exactly."""
    import torch
    from PIL import Image

    from .model.image_processing import process_images

    chunks = []
    for start in range(0, len(pixels), 256):
        images = [Image.fromarray(image) for image in pixels[start : start + 256]]
        chunks.append(torch.nn.functional.avg_pool2d(process_images(images), UPSAMPLING))
    return torch.cat(chunks)


def _load_split(folder: Path, split: str):
    """(:func:`_model_view` of the images, distortion index [N], strength [N]) of a ``qscorer synth`` split."""
    import torch
    from PIL import Image

    records = json.loads((folder / "metas" / f"{split}.json").read_text())
    pixels = np.stack([np.asarray(Image.open(folder / record["image"]).convert("RGB")) for record in records])
    kinds = torch.tensor([DISTORTIONS.index(record["distortion"]) for record in records])
    strengths = torch.tensor([record["strength"] for record in records], dtype=torch.float32)
    return _model_view(pixels), kinds, strengths


def _power_law_texture(side: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """A ``side`` x ``side`` Gaussian texture of unit std whose power spectrum falls as 1 / f^``exponent``: grainy
    near 1, cloudy near 3 (natural images are about 2)."""
    rows = np.fft.fftfreq(side)[:, None]
    columns = np.fft.rfftfreq(side)[None, :]
    frequency = np.hypot(rows, columns)
    frequency[0, 0] = 1.0
    spectrum = (rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)) / frequency ** (exponent / 2)
    spectrum[0, 0] = 0.0
    texture = np.fft.irfft2(spectrum, s=(side, side))
    return texture / texture.std()


def dead_leaves(size: int, rng: np.random.Generator, *, textures: int = 4) -> np.ndarray:
    """A textured dead-leaves image (``size`` x ``size`` x 3 uint8): content of endless variety that cannot be
    memorised, with edges at every scale and textured surfaces, as in photos.

    On a canvas of twice the size, 30..1500 opaque discs are painted over each other, radii of density r^-3 between
    a smallest radius of 2..24 px and the canvas side (count and smallest radius drawn per image: from busy images to
    a few large leaves). Each disc has a colour (grey level uniform, a tint of std 35); half of them a linear gradient
    (per axis N(0, 1) x U(0, 60) grey levels across the canvas); 60% a texture of amplitude U(0, 40) grey levels, one
    of ``textures`` power-law textures (:func:`_power_law_texture`, exponent 1..3). The canvas is downsampled with
    Lanczos, as ``qscorer synth`` resizes its crops. Measured with the encoder alone after 3000 steps, on 400 held-out
    crops of the demo's photos: flat-coloured discs gave SRCC 0.63, these 0.70.
    """
    from PIL import Image, ImageDraw

    side = 2 * size
    discs = int(rng.integers(30, 1500))
    low, high = float(rng.uniform(2.0, 24.0)), float(side)
    u = rng.random(discs)
    radii = 1 / np.sqrt((1 - u) / low**2 + u / high**2)
    centres = rng.uniform(0, side, (discs, 2))
    labels = Image.new("I", (side, side), 0)
    draw = ImageDraw.Draw(labels)
    for index, ((x, y), radius) in enumerate(zip(centres, radii)):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=index)
    leaf = np.asarray(labels).astype(np.int64)
    colours = np.clip(rng.uniform(0, 255, (discs, 1)) + rng.normal(0, 35, (discs, 3)), 0, 255)
    slopes = rng.normal(0, 1, (discs, 2)) * rng.uniform(0, 60, (discs, 1)) / side * (rng.random((discs, 1)) < 0.5)
    fields = np.stack([_power_law_texture(side, exponent, rng) for exponent in rng.uniform(1.0, 3.0, textures)])
    field_of_leaf = rng.integers(0, textures, discs)
    amplitudes = rng.uniform(0, 40, discs) * (rng.random(discs) < 0.6)
    rows, columns = np.mgrid[0:side, 0:side]
    shading = (
        slopes[leaf, 0] * (columns - centres[leaf, 0])
        + slopes[leaf, 1] * (rows - centres[leaf, 1])
        + amplitudes[leaf] * fields[field_of_leaf[leaf], rows, columns]
    )
    canvas = np.clip(np.rint(colours[leaf] + shading[..., None]), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS)).copy()


def _dead_leaves_split(count: int, seed: int):
    """Like :func:`_load_split`: ``count`` distorted dead-leaves images, four per canvas, the distortions in turn at
    uniform strengths."""
    import torch

    from .data.synthetic import apply_distortion

    rng = np.random.default_rng([seed, 2])
    pixels, kinds, strengths = [], [], []
    for index in range(count):
        if index % 4 == 0:
            canvas = dead_leaves(IMAGE_SIZE, rng)
        kind, strength = index % len(DISTORTIONS), float(rng.random())
        pixels.append(apply_distortion(canvas, DISTORTIONS[kind], strength, rng))
        kinds.append(kind)
        strengths.append(strength)
    return _model_view(np.stack(pixels)), torch.tensor(kinds), torch.tensor(strengths, dtype=torch.float32)


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


def pretrain_encoder(images, kinds, strengths, *, steps: int, seed: int = PRETRAINING_SEED,
                     learning_rate: float = 1e-3, batch_size: int = 32, visual_width: int = 64):
    """Pretrain the tiny vision encoder to describe distortions of 112-px images (:func:`_model_view` [N, 3, 112, 112],
    with each one's distortion index and strength); returns the encoder.

    AdamW, warm-up then cosine, gradient norm clipped at 1. Each batch is flipped and turned by a random multiple
    of 90 degrees, and the position embeddings stay at zero: a distortion looks the same wherever it is, and
    positions would let the encoder tell the photos apart by where their content lies.
    """
    import torch
    import torch.nn.functional as F

    from .model.configuration import MplugOwlVisionConfig

    if images.shape[-1] != IMAGE_SIZE:
        raise QScorerError(f"the pretraining images must be {IMAGE_SIZE} px, not {images.shape[-1]}")
    config = MplugOwlVisionConfig(hidden_size=visual_width, intermediate_size=2 * visual_width, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=SOURCE_PATCH)
    model = _DescriptionProbe(config, seed)
    positions = model.encoder.embeddings.position_embedding
    with torch.no_grad():
        positions.zero_()
    positions.requires_grad_(False)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, round(0.03 * steps))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        flip, turns = torch.randint(0, 2, (1,), generator=generator), torch.randint(0, 4, (1,), generator=generator)
        pixels = torch.rot90(images[batch].flip(3) if flip else images[batch], int(turns), (2, 3))
        logits, strength = model(pixels)
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


def pretrain_demo_base(output: str | Path, workdir: str | Path, *, num_photo_images: int = 12000,
                       num_dead_leaves: int = 12000, steps: int = 12000, seed: int = PRETRAINING_SEED) -> Path:
    """Build the demo's base into ``output`` (steps 1-3 of the module docstring); ``workdir`` receives the
    pretraining photo crops and the tokenizer."""
    import torch

    counts = {"num_photo_images": num_photo_images, "num_dead_leaves": num_dead_leaves, "steps": steps}
    for name, value in counts.items():
        if value < 1:
            raise QScorerError(f"{name} must be at least 1, got {value}")

    from .data import build_demo_tokenizer, load_tokenizer
    from .data.synthetic import build_synthetic_iqa
    from .model import MPLUGOwl2LlamaForCausalLM
    from .train.setup import save_base_model

    workdir = Path(workdir)
    data = workdir / "pretraining_data"
    build_synthetic_iqa(data, num_train=num_photo_images, num_test=0, image_size=IMAGE_SIZE, seed=seed,
                        distortions=DISTORTIONS, train_outside_corners=True)
    parts = [_load_split(data, "train"), _dead_leaves_split(num_dead_leaves, seed)]
    images, kinds, strengths = (torch.cat(tensors) for tensors in zip(*parts))
    encoder = pretrain_encoder(images, kinds, strengths, steps=steps, seed=seed)
    tokenizer = build_demo_tokenizer(workdir / "tokenizer")
    torch.manual_seed(seed)
    model = MPLUGOwl2LlamaForCausalLM(tiny_config(load_tokenizer(tokenizer).vocab_size))
    transplant_encoder(model, encoder)
    return save_base_model(model, output, tokenizer)
