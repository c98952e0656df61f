"""Scoring speed, printed as JSON.

1. ``prefill``: qscorer's scoring (one prefill + one KV-cached step) against the original procedure (two full
   forward passes), on the same random-weight model and images, side by side in one run. Goal: time ratio <= 0.55.
2. ``splice``: placing the 65 visual rows of each image into a batch of 32 sequences (7B width, labels and
   mask), qscorer's scatter against the previous per-row loop (kept here as the reference).
3. ``workers``: images/s of batch inference (``qscorer infer`` internals) with 0 vs 2 DataLoader workers decoding
   the images. Goal: >= 1.7x.

CPU (this machine):   python benchmarks/bench_scoring.py
GPU (real 7B shapes, random weights, bf16, batches 1/8/32):
                      python benchmarks/bench_scoring.py --configs 7b --device cuda --dtype bfloat16 \\
                          --batch-sizes 1 8 32 --skip-workers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from random_weights import CONFIGS, EVAL_PROMPT_IDS, random_model

from qscorer.scoring import score_with_two_full_passes


def _timed(function, arguments: tuple, repeats: int, device: str) -> float:
    timings = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function(*arguments)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def bench_prefill(name: str, device: str, dtype: torch.dtype, batch_sizes: list[int], repeats: int) -> list[dict]:
    model = random_model(name, dtype, device)
    rows = []
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=dtype)
        input_ids = torch.tensor([EVAL_PROMPT_IDS] * batch, device=device)
        with torch.inference_mode():
            ours = model.predict_scores(input_ids, pixels)
            _, reference, _, _ = score_with_two_full_passes(model, input_ids, pixels)
            ours_time = _timed(model.predict_scores, (input_ids, pixels), repeats, device)
            reference_time = _timed(score_with_two_full_passes, (model, input_ids, pixels), repeats, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                model.predict_scores(input_ids, pixels)
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = None
        rows.append(
            {
                "config": name,
                "batch": batch,
                "one_prefill_s": round(ours_time, 4),
                "two_full_passes_s": round(reference_time, 4),
                "ratio": round(ours_time / reference_time, 3),
                "images_per_s": round(batch / ours_time, 2),
                "max_score_difference": float((ours.scores.float() - reference.float()).abs().max()),
                "peak_gib": None if peak is None else round(peak, 2),
            }
        )
    return rows


def bench_workers(num_images: int, batch_size: int, image_size: tuple[int, int] = (1024, 768)) -> dict:
    """Batch inference of the tiny model over JPEG files, decoding in the main process vs in 2 workers (with
    torch's CPU threads reduced to leave the workers their cores, as ``qscorer infer`` does)."""
    from qscorer.cli.options import share_cpu_with_workers
    from qscorer.inference import MetaInference
    from qscorer.scoring import Scorer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generator = torch.Generator().manual_seed(0)
        records = []
        (root / "images").mkdir()
        for index in range(num_images):
            pixels = (torch.rand(image_size[1], image_size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / f"{index}.jpg", quality=90)
            records.append({"id": str(index), "image": f"images/{index}.jpg"})
        (root / "meta.json").write_text(json.dumps(records))
        model_folder = save_tiny_checkpoint(root / "model")
        result = {"images": num_images, "batch": batch_size, "image_size": list(image_size)}
        threads = torch.get_num_threads()
        for workers in (0, 2):
            torch.set_num_threads(threads)
            share_cpu_with_workers(workers, "cpu")
            scorer = Scorer(model_folder, device="cpu", dtype="float32", batch_size=batch_size, num_workers=workers)
            job = MetaInference(scorer, root / "meta.json", root, root / f"out{workers}", with_prob=False)
            start = time.perf_counter()
            job.run(job.pending())
            result[f"images_per_s_workers_{workers}"] = round(num_images / (time.perf_counter() - start), 2)
        result["speedup"] = round(result["images_per_s_workers_2"] / result["images_per_s_workers_0"], 2)
        return result


def splice_per_row(input_ids, text_embeds, features, labels, attention_mask):
    """The previous splice, for comparison: each row's text pieces and visual rows concatenated in a Python loop,
    then padded and stacked (one placeholder per row here)."""
    rows = []
    for row in range(input_ids.shape[0]):
        at = int((input_ids[row] == -200).nonzero()[0])
        visual = features[row]
        ones = torch.ones(visual.shape[0], dtype=torch.long)
        rows.append(
            (
                torch.cat([text_embeds[row, :at], visual, text_embeds[row, at + 1 :]]),
                torch.cat(
                    [
                        torch.zeros(at, dtype=torch.long),
                        ones,
                        torch.zeros(input_ids.shape[1] - at - 1, dtype=torch.long),
                    ]
                ),
                torch.cat([labels[row, :at], torch.full_like(ones, -100), labels[row, at + 1 :]]),
                torch.cat([attention_mask[row, :at].bool(), ones.bool(), attention_mask[row, at + 1 :].bool()]),
            )
        )
    longest = max(row[0].shape[0] for row in rows)
    return [
        torch.stack(
            [F.pad(row[part], (0, 0) * (row[part].dim() - 1) + (0, longest - row[part].shape[0])) for row in rows]
        )
        for part in range(4)
    ]


def bench_splice(batch: int = 32, width: int = 4096, repeats: int = 20) -> dict:
    """The splice alone: qscorer's scatter vs the per-row loop, on the same inputs (results compared)."""
    from qscorer.model.modeling import splice_image_features

    torch.manual_seed(0)
    input_ids = torch.tensor([EVAL_PROMPT_IDS] * batch)
    text = torch.randn(batch, input_ids.shape[1], width)
    features = torch.randn(batch, 65, width)
    labels = torch.full_like(input_ids, -100)
    mask = torch.ones_like(input_ids)
    ours = splice_image_features(input_ids, text, features, labels, mask)
    reference = splice_per_row(input_ids, text, features, labels, mask)
    assert torch.equal(ours.inputs_embeds, reference[0]) and torch.equal(ours.modality_indicators, reference[1])
    timings = {}
    for name, function in (("scatter", splice_image_features), ("per_row_loop", splice_per_row)):
        start = time.perf_counter()
        for _ in range(repeats):
            function(input_ids, text, features, labels, mask)
        timings[name] = (time.perf_counter() - start) / repeats
    return {
        "batch": batch,
        "width": width,
        "scatter_ms": round(timings["scatter"] * 1000, 2),
        "per_row_loop_ms": round(timings["per_row_loop"] * 1000, 2),
        "ratio": round(timings["scatter"] / timings["per_row_loop"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--worker-images", type=int, default=48)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed, when installed, logs to stdout on import
        report = measure(args, dtype)
    print(json.dumps(report, indent=1))


def measure(args, dtype: torch.dtype) -> dict:
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prefill": [
            row
            for name in args.configs
            for row in bench_prefill(name, args.device, dtype, args.batch_sizes, args.repeats)
        ],
        "goal_ratio": 0.55,
        "splice": bench_splice(),
    }
    if not args.skip_workers:
        report["workers"] = [
            bench_workers(args.worker_images, batch_size=8, image_size=size) for size in ((1024, 768), (2048, 1536))
        ]
        report["goal_speedup"] = 1.7
    return report


if __name__ == "__main__":
    main()
