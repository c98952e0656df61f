"""The whole pipeline on a tiny pretrained model, on CPU, with no download (``qscorer demo`` runs it).

1. ``synth``: a synthetic IQA set (graded blur, JPEG, noise and pixelation, MOS 1..5, 112 px) from six bundled
   photos (:data:`~qscorer.demo_base.DEMO_PHOTOS`); train and held-out images come from disjoint crops, the held-out
   ones from the photos' corners, which the base's pretraining never saw.
2. ``train``: fine-tuning of the shipped tiny base (:mod:`qscorer.demo_base`: LLM width 64, vision encoder
   pretrained to describe distortions) with the real training code: score tokens, regression head,
   LLM and abstractor trainable, the pretrained vision encoder frozen (as in ``scripts/train_lora.sh``).
3. ``infer``: batch inference on the held-out images, scored after the prompt the model was trained on
   (``--prompt training``); 4. ``eval``: SRCC / PLCC table and a scatter plot.

Each step goes through the ``qscorer`` command line, exactly as a user would run it. The model is tiny and its data
synthetic: the numbers show that fine-tuning learns, not how good Q-Scorer is on real photos.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .demo_base import DEMO_PHOTOS, DISTORTIONS, IMAGE_SIZE, SHIPPED_BASE, tiny_config
from .errors import QScorerError

logger = logging.getLogger(__name__)


def synth_arguments(data: Path, *, num_train: int, num_test: int, seed: int) -> list[str]:
    """The ``qscorer synth`` command line of the demo's data: 112-px images of :data:`DEMO_PHOTOS`."""
    return [
        "synth", "--out", str(data), "--num-train", str(num_train), "--num-test", str(num_test),
        "--image-size", str(IMAGE_SIZE), "--seed", str(seed), "--distortions", ",".join(DISTORTIONS),
        "--photos", ",".join(DEMO_PHOTOS),
    ]  # fmt: skip


DEMO_NUM_TRAIN, DEMO_NUM_TEST, DEMO_EPOCHS = 400, 100, 12.0
"""The demo's default data sizes and training epochs."""

DEMO_PROMPT = "training"
"""The prompt the demo scores with: the fine-tuning template's prefix, the context the head was trained at."""

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_NUM_TEST",
    "DEMO_NUM_TRAIN",
    "DEMO_PROMPT",
    "run_demo",
    "synth_arguments",
    "tiny_config",
    "training_arguments",
]


def training_arguments(base: Path, data: Path, output: Path, *, epochs: float, seed: int) -> list[str]:
    """The ``qscorer train`` command line of the demo: the LLM, abstractor, score tokens and head trained on the
    score records, the pretrained vision encoder frozen, cosine schedule, at a tiny model's scale."""
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
        "freeze_vision_model": True,
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
    return ["train", *(item for key, value in flags.items() for item in (f"--{key}", str(value)))]


def inference_arguments(checkpoint: Path, data: Path, results: Path, *, prompt: str) -> list[str]:
    """The ``qscorer infer`` command line that scores the held-out images after ``prompt``."""
    return [
        "infer", "--model-path", str(checkpoint), "--meta-paths", str(data / "metas" / "test.json"),
        "--root-dir", str(data), "--save-dir", str(results), "--prompt", prompt, "--device", "cpu",
        "--dtype", "float32", "--batch-size", "16", "--num-workers", "2",
    ]  # fmt: skip


def run_demo(
    out_dir: str | Path, *, num_train: int, num_test: int, epochs: float, seed: int, base: str | Path = SHIPPED_BASE
) -> dict:
    """Run the four steps into ``out_dir``; returns the evaluation metrics, the step timings and the output paths."""
    from .cli import main

    out = Path(out_dir)
    data, checkpoint, results = out / "data", out / "checkpoint", out / "results"
    timings = {}

    def step(name: str, argv: list[str]) -> None:
        logger.info("demo step: qscorer %s", " ".join(argv))
        start = time.perf_counter()
        status = main(argv)
        timings[name] = round(time.perf_counter() - start, 1)
        if status != 0:
            raise QScorerError(f"demo step {name!r} failed with exit status {status}")

    step("synth", synth_arguments(data, num_train=num_train, num_test=num_test, seed=seed))
    step("train", training_arguments(Path(base), data, checkpoint, epochs=epochs, seed=seed))
    step("infer", inference_arguments(checkpoint, data, results, prompt=DEMO_PROMPT))
    report = results / "results.json"
    step("eval", ["eval", "--pred_paths", str(results / "test.json"), "--gt_paths", str(data / "metas" / "test.json"),
                  "--out", str(report), "--plot-dir", str(results / "plots")])  # fmt: skip
    return {
        "metrics": json.loads(report.read_text())["test"],
        "seconds": timings,
        "prompt": DEMO_PROMPT,
        "predictions": str(results / "test.json"),
        "plot": str(results / "plots" / "test.png"),
        "checkpoint": str(checkpoint),
        "base": str(base),
    }
