"""The whole pipeline on a tiny model, on CPU, with no download (``qscorer demo`` runs it).

1. ``synth``: a synthetic IQA set from scikit-image's bundled photos (graded blur, JPEG, noise, … with MOS 1..5).
2. A tiny base model: a LLaMA-style tokenizer trained on the spot and a randomly initialised mPLUG-Owl2 with
   LLM width 64 (the 7B model has 4096), see :func:`tiny_config`.
3. ``train``: fine-tuning with the real training code (score tokens, regression head and, for a tiny random model,
   every weight trainable).
4. ``infer``: batch inference on the held-out images; 5. ``eval``: SRCC / PLCC table and a scatter plot.

Each step goes through the ``qscorer`` command line, exactly as a user would run it. The model is tiny and trained
for a couple of minutes: its numbers show that the pipeline works, not how good Q-Scorer is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import QScorerError

logger = logging.getLogger(__name__)


def tiny_config(vocab_size: int, *, llm_width: int = 64, visual_width: int = 64, patch_size: int = 28):
    """The tiny architecture of the demo and the miniature benchmark: every mPLUG-Owl2 part at 448 px, two layers
    each, small widths, and 28-px patches (16 x 16 = 256 patches; the 7B model has 14-px patches, 1024 of them).

    ``initializer_range`` is width^-0.5 (0.125 at width 64): the 7B model's 0.02 suits width 4096, and at width 64 it
    leaves every residual branch so small that the visual tokens barely depend on the image (measured: 2% spread
    across images at 0.02, 75% at 0.125), and a model trained from scratch learns nothing about quality.
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
                "grid_size": 448 // patch_size,
            },
        },
    )


DEMO_DISTORTIONS = ("blur", "jpeg", "noise", "pixelate")
"""The structural distortions: global brightness and contrast changes are largely normalised away by the LayerNorm
that follows the patch embedding, so a tiny model trained for two minutes cannot pick them up."""

HEAD_START = 3.0
"""Starting value of the head's output bias for models trained from scratch: the middle of the score scale."""


def build_tiny_base(folder: str | Path, seed: int = 0) -> Path:
    """A base-model folder like ``mplug-owl2-llama2-7b`` (config, weights, tokenizer, image-processor config), with
    the tiny architecture and random weights; no score tokens yet (training adds them)."""
    from .data import build_demo_tokenizer, load_tokenizer
    from .train.setup import write_base_model

    tokenizer = build_demo_tokenizer(Path(folder) / "tokenizer")
    config = tiny_config(load_tokenizer(tokenizer).vocab_size)
    return write_base_model(folder, config, tokenizer, seed=seed, head_start=HEAD_START)


def training_arguments(base: Path, data: Path, output: Path, *, epochs: float, seed: int) -> list[str]:
    """The ``qscorer train`` flags of the demo: scripts/train_lora.sh's recipe scaled to a tiny model on CPU, with
    every weight trained (a random tiny LLM has nothing worth keeping frozen; LoRA learns less in two minutes)."""
    flags = {
        "model_name_or_path": base,
        "version": "v1",
        "dataset_type": "single",
        "data_paths": data / "metas" / "train.json",
        "data_weights": 1,
        "image_folder": data,
        "output_dir": output,
        "lora_enable": False,
        "image_aspect_ratio": "pad",
        "group_by_modality_length": True,
        "tune_visual_abstractor": True,
        "freeze_vision_model": False,
        "weight_next_token": 1.0,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "logging_steps": 10,
        "save_strategy": "no",
        "model_max_length": 2048,
        "dataloader_num_workers": 2,
        "report_to": "none",
        "attn_implementation": "sdpa",
        "dataloader_pin_memory": False,
        "seed": seed,
    }
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def run_demo(out_dir: str | Path, *, num_train: int, num_test: int, epochs: float, seed: int) -> dict:
    """Run the five steps into ``out_dir``; returns the evaluation metrics and the output paths."""
    from .cli import main
    from .data.synthetic import build_synthetic_iqa

    out = Path(out_dir)
    data, base, checkpoint, results = out / "data", out / "tiny_base", out / "checkpoint", out / "results"
    timings = {}

    def step(name: str, function) -> None:
        logger.info("demo step: %s", name)
        start = time.perf_counter()
        status = function()
        timings[name] = round(time.perf_counter() - start, 1)
        if isinstance(status, int) and status != 0:
            raise QScorerError(f"demo step {name!r} failed with exit status {status}")

    step(
        "synth",
        lambda: build_synthetic_iqa(
            data, num_train=num_train, num_test=num_test, image_size=224, seed=seed, distortions=DEMO_DISTORTIONS
        ),
    )
    step("tiny base model", lambda: build_tiny_base(base, seed=seed))
    step("train", lambda: main(["train", *training_arguments(base, data, checkpoint, epochs=epochs, seed=seed)]))
    infer = [
        "infer", "--model-path", str(checkpoint), "--meta-paths",
        str(data / "metas" / "test.json"), "--root-dir", str(data), "--save-dir", str(results),
        "--device", "cpu", "--dtype", "float32", "--batch-size", "16", "--num-workers", "2",
    ]  # fmt: skip
    step("infer", lambda: main(infer))
    report = results / "results.json"
    evaluate = ["eval", "--pred_paths", str(results / "test.json"), "--gt_paths", str(data / "metas" / "test.json"),
                "--out", str(report), "--plot-dir", str(results / "plots")]  # fmt: skip
    step("eval", lambda: main(evaluate))
    metrics = json.loads(report.read_text())["test"]
    return {
        "metrics": metrics,
        "seconds": timings,
        "predictions": str(results / "test.json"),
        "plot": str(results / "plots" / "test.png"),
        "checkpoint": str(checkpoint),
    }
