"""Load test of ``qscorer serve`` on the loopback, printed as JSON.

For each model config, side by side in one run: ``clients`` concurrent clients each send ``requests`` requests of
1-4 images (PNG files, drawn from a pool of distinct images) to

- ``server``: the service with ``--max-batch-size B``,
- ``server_batch_1``: the same service with ``--max-batch-size 1``,

and the same image sequence is scored in-process (``in_process``: ``Scorer.score`` at batch size B, as
``qscorer score`` does; in a worker thread, like the service's model). Every response is checked against the
in-process result of its own images: ``failed`` (an error answer), ``lost`` (no answer or a wrong count) and
``mismatched`` (a name or a score that is not its image's) must all be 0. The arms alternate over ``--rounds``
rounds so that a change of machine load hits them all. The clients run in a separate process (stdlib
``qscorer.client``), the service in this one (one model for all arms).

Goals: server images/s >= 0.8 x in-process (``server_vs_in_process``), and ``batching_gain`` (server / server at
batch 1) close to ``model_batch_gain`` (the model alone at batch B / batch 1, on decoded pixels). On a shared
machine, wall-clock rates follow the CPU share each arm happened to get; ``cpu_ms_per_image`` (CPU time of the
service's process, or of the in-process scoring, per image) and ``cpu_server_vs_in_process`` show the service's own
cost whatever the load.

CPU (this machine):  python benchmarks/bench_serve.py                     # tiny, 32 clients x 20 requests
                     python benchmarks/bench_serve.py --configs mid --requests 3
GPU:                 python benchmarks/bench_serve.py --configs mid --device cuda --dtype bfloat16 --max-batch-size 32
real weights:        python benchmarks/bench_serve.py --model-path CKPT --model-base BASE --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from qscorer.cli.serve import decode_threads_default

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` distinct PNG files: smooth colour fields with texture, like generated images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    y, x = np.mgrid[0:height, 0:width] / max(size)
    paths = []
    for index in range(count):
        frequencies = rng.uniform(1, 12, (3, 2))
        phases = rng.uniform(0, 6.3, 3)
        channels = [np.sin(f[0] * x * 6.3 + f[1] * y * 6.3 + p) for f, p in zip(frequencies, phases)]
        pixels = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
        path = folder / f"image_{index:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def build_checkpoint(name: str, folder: Path) -> Path:
    """A random-weight checkpoint folder of ``random_weights.CONFIGS[name]`` (tiny or mid; loaded like a user's),
    initialised at width^-0.5 so that scores differ between images (at 0.02 a narrow model scores every image
    alike)."""
    sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
    from random_weights import CONFIGS
    from tiny import save_tiny_checkpoint

    config = CONFIGS[name]
    return save_tiny_checkpoint(folder, seed=0, initializer_range=config["hidden_size"] ** -0.5, **config)


def plan_requests(images: list[Path], clients: int, requests: int, seed: int) -> list[list[list[str]]]:
    """clients x requests lists of 1-4 image paths."""
    rng = random.Random(seed)
    return [[[str(path) for path in rng.sample(images, rng.randint(1, 4))] for _ in range(requests)]
            for _ in range(clients)]


def run_clients(url: str, plan: list[list[list[str]]], timeout: float) -> dict:
    """Send the plan (one thread per client) and return the answers, latencies and wall time. Runs in a child
    process, so the clients do not share the service's interpreter."""
    from qscorer.client import Client

    client = Client(url, timeout=timeout, retries=0)

    def one_client(requests: list[list[str]]) -> list[dict]:
        answers = []
        for paths in requests:
            start = time.perf_counter()
            try:
                results = client.results(paths)
                answer = {"results": [[result["image"], result["score"]] for result in results]}
            except Exception as error:  # every failure is counted, whatever its kind
                answer = {"error": str(error)}
            answers.append({**answer, "latency_s": time.perf_counter() - start, "images": paths})
        return answers

    start = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        answers = [answer for per_client in pool.map(one_client, plan) for answer in per_client]
    return {"answers": answers, "wall_s": time.perf_counter() - start}


def serve_and_load(scorer, plan, settings, timeout: float) -> dict:
    from qscorer.serving import background_server, create_app

    app = create_app(scorer, settings)
    with background_server(app) as url, multiprocessing.get_context("spawn").Pool(1) as clients:
        cpu = process_cpu_s()
        outcome = clients.apply(run_clients, (url, plan, timeout))
        outcome["cpu_s"] = process_cpu_s() - cpu
    outcome["batch_sizes"] = dict(sorted(app.state.batcher.batch_sizes.items()))
    return outcome


def process_cpu_s() -> float:
    """CPU seconds used so far by this process's threads (the service's, not the clients' process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check(answers: list[dict], expected: dict[str, float], tolerance: float) -> dict:
    """Failed, lost and mismatched answers against each image's in-process score."""
    from pathlib import PurePath

    failed = [answer for answer in answers if "error" in answer]
    lost = [answer for answer in answers if "results" in answer and len(answer["results"]) != len(answer["images"])]
    mismatched = [
        answer for answer in answers if "results" in answer and len(answer["results"]) == len(answer["images"])
        and any(name != PurePath(path).name or abs(score - expected[path]) > tolerance
                for (name, score), path in zip(answer["results"], answer["images"]))
    ]
    return {"failed": len(failed), "lost": len(lost), "mismatched": len(mismatched),
            "first_error": failed[0]["error"] if failed else None}


def in_model_thread(function, *arguments):
    """Run ``function`` in a fresh worker thread, as the service runs its model: which thread calls torch changes
    its CPU speed (OpenMP thread teams; on a loaded 2-core machine the main thread was measured 4x slower), and the
    comparison must be about the service alone."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(function, *arguments).result()


def model_images_per_s(scorer, batch: int, repeats: int = 3) -> float:
    """The model alone (``Scorer.predict`` on decoded pixels), images per second at ``batch``."""
    import torch

    pixels = torch.randn(batch, 3, 448, 448)
    scorer.predict(pixels)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.predict(pixels)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return batch / statistics.median(timings)


@dataclass
class Load:
    """The load of one row: clients x requests (1-4 images each), alternating arms over ``rounds``."""

    clients: int = 32
    requests: int = 20
    rounds: int = 2
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    decode_threads: int = field(default_factory=decode_threads_default)
    timeout: float = 600.0
    tolerance: float = 1e-5


def service_row(name: str, scorer, images: list[Path], load: Load) -> dict:
    """The three arms (service at batch B and 1, in-process at B) on one model, with the checks and ratios."""
    from qscorer.scoring import Scorer
    from qscorer.serving import ServeSettings

    batched = Scorer.from_model(scorer.model, scorer.tokenizer, clamp=False, batch_size=load.max_batch_size)
    single = Scorer.from_model(scorer.model, scorer.tokenizer, clamp=False, batch_size=1)
    settings = ServeSettings(max_wait_ms=load.max_wait_ms, decode_threads=load.decode_threads, max_queue=1024)
    plan = plan_requests(images, load.clients, load.requests, seed=1)
    per_round = -(-load.requests // load.rounds)
    rounds = [[requests[start:start + per_round] for requests in plan]
              for start in range(0, load.requests, per_round)]
    arms = {"server": [], "server_batch_1": [], "in_process": []}
    expected: dict[str, float] = {}
    batch_sizes: dict[str, dict] = {"server": {}, "server_batch_1": {}}
    for round_plan in rounds:
        for arm, arm_scorer in (("server", batched), ("server_batch_1", single)):
            outcome = serve_and_load(arm_scorer, round_plan, settings, load.timeout)
            arms[arm].append(outcome)
            for size, count in outcome["batch_sizes"].items():
                batch_sizes[arm][size] = batch_sizes[arm].get(size, 0) + count
        paths = [path for requests in round_plan for request in requests for path in request]
        start, cpu = time.perf_counter(), process_cpu_s()
        results = in_model_thread(batched.score, paths)
        arms["in_process"].append({"wall_s": time.perf_counter() - start, "cpu_s": process_cpu_s() - cpu})
        expected.update((path, result.score) for path, result in zip(paths, results))

    total_images = sum(len(request) for requests in plan for request in requests)
    row = {"config": name, "clients": load.clients, "requests_per_client": load.requests,
           "images": total_images, "max_batch_size": load.max_batch_size}
    for arm in ("server", "server_batch_1"):
        answers = [answer for outcome in arms[arm] for answer in outcome["answers"]]
        latencies = sorted(answer["latency_s"] for answer in answers)
        wall = sum(outcome["wall_s"] for outcome in arms[arm])
        row[arm] = {
            "images_per_s": round(total_images / wall, 2),
            "cpu_ms_per_image": round(1000 * sum(outcome["cpu_s"] for outcome in arms[arm]) / total_images, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
            "answers": len(answers),
            **check(answers, expected, load.tolerance),
            "batch_sizes": dict(sorted(batch_sizes[arm].items())),
        }
    row["in_process"] = {
        "images_per_s": round(total_images / sum(outcome["wall_s"] for outcome in arms["in_process"]), 2),
        "cpu_ms_per_image": round(1000 * sum(outcome["cpu_s"] for outcome in arms["in_process"]) / total_images, 1),
    }
    row["server_vs_in_process"] = round(row["server"]["images_per_s"] / row["in_process"]["images_per_s"], 3)
    row["cpu_server_vs_in_process"] = round(
        row["server"]["cpu_ms_per_image"] / row["in_process"]["cpu_ms_per_image"], 3
    )
    row["batching_gain"] = round(row["server"]["images_per_s"] / row["server_batch_1"]["images_per_s"], 3)
    batched_speed = in_model_thread(model_images_per_s, batched, load.max_batch_size)
    row["model_batch_gain"] = round(batched_speed / in_model_thread(model_images_per_s, batched, 1), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=["tiny", "mid"])
    parser.add_argument("--model-path", help="benchmark a real checkpoint instead of the random configs")
    parser.add_argument("--model-base", help="its base model (LoRA checkpoints)")
    parser.add_argument("--preprocessor-path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2, help="the arms alternate over this many rounds")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--decode-threads", type=int, default=decode_threads_default(),
                        help="as qscorer serve's --num-workers (default: half the cores, at most 8)")
    parser.add_argument("--pool", type=int, default=64, help="distinct images the requests draw from")
    parser.add_argument("--image-size", type=int, nargs=2, default=[512, 512], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a client waits for one answer")
    parser.add_argument("--tolerance", type=float, help="score difference that counts as a mismatch "
                        "(default 1e-5 in float32, 5e-2 in 16-bit: batching changes 16-bit rounding)")
    args = parser.parse_args()
    if args.tolerance is None:
        args.tolerance = 1e-5 if args.dtype == "float32" else 5e-2
    load = Load(**{name: getattr(args, name) for name in Load.__dataclass_fields__})
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed, when installed, logs to stdout on import
        report = measure(args, load)
    print(json.dumps(report, indent=1))


def measure(args, load: Load) -> dict:
    import torch

    from qscorer.cli.options import share_cpu_with_workers
    from qscorer.scoring import Scorer

    share_cpu_with_workers(args.decode_threads, args.device)  # as qscorer serve does, for every arm

    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "decode_threads": args.decode_threads,
        "max_wait_ms": args.max_wait_ms,
        "image_size": args.image_size,
        "goal_server_vs_in_process": 0.8,
        "load_average_before": _load_average(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        images = make_images(Path(folder), args.pool, tuple(args.image_size))
        models = {"checkpoint": args.model_path} if args.model_path else {name: None for name in args.configs}
        for name, model_path in models.items():
            model_path = model_path or build_checkpoint(name, Path(folder) / name)
            scorer = Scorer(model_path, args.model_base, args.preprocessor_path, device=args.device,
                            dtype=args.dtype, clamp=False)
            report["rows"].append(service_row(name, scorer, images, load))
            del scorer
    report["load_average_after"] = _load_average()
    return report


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(value, 2) for value in os.getloadavg()]
    return None


if __name__ == "__main__":
    main()
