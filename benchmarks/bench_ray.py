"""Images/s of ``qscorer infer --engine ray`` against the default engine on the same images and model, as JSON.

Both engines run the real command in this process (``qscorer.cli.main``) with their defaults: the default engine
decodes in 2 DataLoader workers and scores in the main process; the Ray engine decodes in Ray CPU tasks and scores
in one actor on a local Ray with every core of this machine. Both append each scored batch to a part file, which a
thread watches: ``first_result_s`` is the time to the first written record (model loading, and for Ray the start of
its workers and actor), ``steady_images_per_s`` the rate from the first to the last record, ``total_s`` the whole
run. Runs alternate between the engines, ``--repeats`` times; the report gives medians and every run. Starting Ray
itself (``ray_init_s``) is measured apart: a cluster is started once, not per run. An untimed run of each engine on
16 images comes first (imports, Ray's first worker processes).

    python benchmarks/bench_ray.py                       # tiny model, 256 JPEGs of 1024 x 768, 2 repeats
    python benchmarks/bench_ray.py --config mid --images 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from random_weights import CONFIGS  # noqa: E402
from tiny import save_tiny_checkpoint  # noqa: E402

from qscorer.cli import main as qscorer_main  # noqa: E402


def write_images(root: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` random JPEGs (shared between metas) and a meta listing them; returns the meta."""
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


def run_infer(model: Path, meta: Path, root: Path, save_dir: Path, *extra: str) -> None:
    arguments = ["infer", "--model-path", str(model), "--meta-paths", str(meta), "--root-dir", str(root)]
    status = qscorer_main([*arguments, "--save-dir", str(save_dir), "--device", "cpu", "--dtype", "float32", *extra])
    if status != 0:
        raise SystemExit(f"qscorer infer {' '.join(extra)}: status {status}")


def timed_infer(model: Path, meta: Path, root: Path, save_dir: Path, *extra: str) -> dict:
    """Run ``qscorer infer`` and time it, watching its part file for the records written so far."""
    part = save_dir / f".{meta.name}.part0"
    arrivals, done = [], threading.Event()

    def watch() -> None:
        written = 0
        while not done.is_set():
            count = part.read_bytes().count(b"\n") if part.exists() else written
            if count > written:
                arrivals.append((time.perf_counter(), count))
                written = count
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    try:
        run_infer(model, meta, root, save_dir, *extra)
    finally:
        done.set()
        watcher.join()
    total = time.perf_counter() - start
    if len(arrivals) < 2:
        raise SystemExit(f"qscorer infer {' '.join(extra)}: the part file grew only {len(arrivals)} time(s)")
    (first_time, first_count), (last_time, last_count) = arrivals[0], arrivals[-1]
    return {
        "total_s": round(total, 2),
        "first_result_s": round(first_time - start, 2),
        "steady_images_per_s": round((last_count - first_count) / (last_time - first_time), 2),
    }


def median_of(runs: list[dict]) -> dict:
    return {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}


def measure(args) -> dict:
    import ray

    size = tuple(args.image_size)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = save_tiny_checkpoint(root / "model", **CONFIGS[args.config])
        meta, warm_up = write_images(root, args.images, size), write_images(root, 16, size)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - start
        engines = {
            "torch": ["--batch-size", str(args.batch_size)],
            "ray": ["--batch-size", str(args.batch_size), "--engine", "ray", "--num-actors", str(args.num_actors)],
        }
        runs = {engine: [] for engine in engines}
        try:
            for engine, options in engines.items():
                run_infer(model, warm_up, root, root / f"warm_up_{engine}", *options)
            for repeat in range(args.repeats):
                for engine, options in engines.items():
                    runs[engine].append(timed_infer(model, meta, root, root / f"{engine}{repeat}", *options))
        finally:
            ray.shutdown()
    torch_run, ray_run = median_of(runs["torch"]), median_of(runs["ray"])
    return {
        "config": args.config,
        "cpus": os.cpu_count(),
        "load_average_before": args.load_before,
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "images": args.images,
        "image_size": args.image_size,
        "batch": args.batch_size,
        "ray_actors": args.num_actors,
        "ray_init_s": round(ray_init, 2),
        "torch_engine": torch_run,
        "ray_engine": ray_run,
        "ray_steady_state_ratio": round(ray_run["steady_images_per_s"] / torch_run["steady_images_per_s"], 2),
        "ray_overhead_per_image_s": round(
            1 / ray_run["steady_images_per_s"] - 1 / torch_run["steady_images_per_s"], 4
        ),
        "ray_extra_first_result_s": round(ray_run["first_result_s"] - torch_run["first_result_s"], 2),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "mid"], default="tiny", help="model shapes of random_weights.py")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
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
