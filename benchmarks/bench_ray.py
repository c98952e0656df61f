"""Images/s of ``qscorer infer --engine ray`` against the default engine on the same images and model, as JSON.

Both engines run the real command in this process (``qscorer.cli.main``) with its defaults: the default engine
decodes in 2 DataLoader workers and scores in the main process; the Ray engine decodes in Ray CPU tasks and scores
in one actor on a local Ray with every core of this machine. Each run includes loading the model, so each engine is
timed on two numbers of images: the difference gives the time per image in the steady state (``per_image_s``), the
rest is the fixed cost of a run (``fixed_s``: model loading, and for Ray the start of its workers and actors).
Starting Ray itself (``ray_init_s``) is measured apart: a cluster is started once, not per run; one untimed run of
each engine comes first (imports, Ray's first worker processes).

    python benchmarks/bench_ray.py                       # tiny model, 64 and 256 JPEGs of 1024 x 768
    python benchmarks/bench_ray.py --config mid --images 16 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_scoring import CONFIGS  # noqa: E402
from tiny import save_tiny_checkpoint  # noqa: E402

from qscorer.cli import main as qscorer_main  # noqa: E402


def write_images(root: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` random JPEGs and a meta listing them; returns the meta."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(count):
        name = f"images/{index}.jpg"
        if not (root / name).exists():
            pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name, quality=90)
        records.append({"id": str(index), "image": name})
    meta = root / f"meta_{count}.json"
    meta.write_text(json.dumps(records))
    return meta


def timed_infer(model: Path, meta: Path, root: Path, save_dir: Path, *extra: str) -> float:
    start = time.perf_counter()
    arguments = ["infer", "--model-path", str(model), "--meta-paths", str(meta), "--root-dir", str(root)]
    status = qscorer_main([*arguments, "--save-dir", str(save_dir), "--device", "cpu", "--dtype", "float32", *extra])
    if status != 0:
        raise SystemExit(f"qscorer infer {' '.join(extra)} failed with status {status}")
    return time.perf_counter() - start


def summary(counts: list[int], seconds: list[float]) -> dict:
    per_image = (seconds[-1] - seconds[0]) / (counts[-1] - counts[0])
    return {
        "seconds": [round(value, 2) for value in seconds],
        "images_per_s": [round(count / value, 2) for count, value in zip(counts, seconds)],
        "per_image_s": round(per_image, 4),
        "fixed_s": round(seconds[0] - per_image * counts[0], 2),
    }


def measure(args) -> dict:
    import ray

    counts = sorted(args.images)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = save_tiny_checkpoint(root / "model", **CONFIGS[args.config])
        metas = {count: write_images(root, count, tuple(args.image_size)) for count in counts}
        start = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - start
        engines = {
            "torch": ["--batch-size", str(args.batch_size)],
            "ray": ["--batch-size", str(args.batch_size), "--engine", "ray", "--num-actors", str(args.num_actors)],
        }
        times = {"torch": [], "ray": []}
        try:
            for engine, options in engines.items():  # warm-up: first imports, Ray's first worker processes
                timed_infer(model, metas[counts[0]], root, root / f"warm_{engine}", *options)
            for count in counts:
                for engine, options in engines.items():
                    times[engine].append(timed_infer(model, metas[count], root, root / f"{engine}{count}", *options))
        finally:
            ray.shutdown()
    torch_summary, ray_summary = summary(counts, times["torch"]), summary(counts, times["ray"])
    return {
        "config": args.config,
        "cpus": os.cpu_count(),
        "load_average_before": args.load_before,
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "images": counts,
        "image_size": args.image_size,
        "batch": args.batch_size,
        "ray_actors": args.num_actors,
        "ray_init_s": round(ray_init, 2),
        "torch_engine": torch_summary,
        "ray_engine": ray_summary,
        "ray_overhead_per_image_s": round(ray_summary["per_image_s"] - torch_summary["per_image_s"], 4),
        "ray_extra_fixed_s": round(ray_summary["fixed_s"] - torch_summary["fixed_s"], 2),
        "steady_state_ratio": round(torch_summary["per_image_s"] / ray_summary["per_image_s"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "mid"], default="tiny", help="model shapes of bench_scoring.py")
    parser.add_argument("--images", nargs=2, type=int, default=[64, 256], help="two numbers of images")
    parser.add_argument("--image-size", nargs=2, type=int, default=[1024, 768])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-actors", type=int, default=1)
    args = parser.parse_args()
    args.load_before = [round(value, 2) for value in os.getloadavg()]
    logging.disable(logging.INFO)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed, when installed, logs to stdout on import
        report = measure(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
