"""The GPU check: one command for a lent H100 / H200 (about 5 minutes), JSON into a folder.

    python benchmarks/gpu_check.py --out gpu_check_out [--shared ../shared]
    python benchmarks/gpu_check.py --out cpu_check --device cpu --quick     # the same steps on CPU, batch 1

Sections (each recorded as it finishes, so a timeout keeps what was measured; one failing section does not stop
the others):

1. ``throughput``: the 7B shapes with random weights, bf16 and fp16: images/s at batch 1 / 8 / 32 with qscorer's
   one prefill + one cached step, next to the original's two full passes, in the same run; peak memory.
2. ``memory``: peak memory of loading and scoring (batch 8) the 7B model in fp16, 8-bit and 4-bit.
3. ``parity``: the tiny parity checkpoints (``--shared``) scored in float32 on CUDA and on CPU: max difference
   (goal <= 1e-4), and against the original's golden scores.
4. ``batch_invariance``: fp16 and fp32, 8 images scored one at a time and as one batch of 8: max score difference,
   and the relative difference of image 0's activations after the vision encoder, the abstractor and several LLM
   layers (where the two runs part, and whether the difference grows through the layers).
5. ``attention``: the 7B shapes in bf16 at batch 8 with each attention kernel (eager, sdpa, and flash_attention_2
   where flash-attn is installed): images/s and the largest score difference from eager; and the parity
   checkpoint scored on the device in float32 and bfloat16 with each kernel, against the original's golden scores.
6. ``serve``: ``qscorer serve``'s service on the 7B shapes (random weights, bf16, the LLaMA-2 tokenizer from
   ``--shared``): 32 clients x 4 requests of 1-4 PNG images on the loopback, at max batch 32 and 1, next to
   in-process ``Scorer`` at batch 32 (``benchmarks/bench_serve.py``): images/s, p50/p95, failed / lost / mismatched.
7. ``training_step``: one LoRA training step at 7B with train_lora.sh's set-up (r 128 on q_proj / v_proj.multiway.1,
   vision encoder, abstractor, lm_head and head trainable), batch 16, bf16 autocast, gradient checkpointing,
   AdamW: seconds per step and peak memory.

``--quick`` runs batch 1 only and the training step with ``--train-layers`` LLM layers (default 2 with --quick):
the 7B widths, fewer layers, so the CPU check fits in 24 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from random_weights import EVAL_PROMPT_IDS, config_named, random_model

from qscorer.scoring import Scorer, score_with_two_full_passes

logger = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parents[1]
PARITY_IMAGES = ("boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png")
CONFIG = "7b"
"""The architecture (a name of ``random_weights.CONFIGS``); ``--config`` changes it for a smoke run."""
TRAIN_ANSWER = [29871, 32003, 29889, 2]
"""Ids of the answer tail "▁ <score4> . </s>" after the prompt's "... is": the head reads the position before
``<score4>``."""


class Device:
    """Timing and peak memory on CUDA (synchronised) or CPU (peak RSS from /proc)."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
        return float("nan")

    def timed(self, function, *arguments, repeats: int = 3) -> float:
        function(*arguments)
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            function(*arguments)
            self.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]


def _inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 448, 448, generator=generator).to(device, dtype)
    return torch.tensor([EVAL_PROMPT_IDS] * batch, device=device), pixels


def _range(scores: torch.Tensor) -> list[float]:
    """[min, max] of a batch's scores: the random model's scores are not on the 1-5 scale, so differences are read
    against this spread."""
    return [round(float(scores.min()), 3), round(float(scores.max()), 3)]


def throughput(device: Device, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        model = random_model(CONFIG, dtype, device.device)
        for batch in batches:
            input_ids, pixels = _inputs(batch, device.device, dtype)
            with torch.inference_mode():
                ours = model.predict_scores(input_ids, pixels)
                _, reference, _, _ = score_with_two_full_passes(model, input_ids, pixels)
                device.reset_peak()
                ours_s = device.timed(model.predict_scores, input_ids, pixels, repeats=repeats)
                peak = device.peak_gib()
                reference_s = device.timed(score_with_two_full_passes, model, input_ids, pixels, repeats=repeats)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "one_prefill_images_per_s": round(batch / ours_s, 2),
                    "two_full_passes_images_per_s": round(batch / reference_s, 2),
                    "time_ratio": round(ours_s / reference_s, 3),
                    "max_score_difference": float((ours.scores.float() - reference.float()).abs().max()),
                    "score_range": _range(ours.scores.float()),
                    "peak_gib": peak,
                }
            )
            logger.info("throughput %s", rows[-1])
        del model
    return rows


def memory(device: Device, batch: int) -> list[dict]:
    rows = []
    for mode in (None, "8bit", "4bit"):
        device.reset_peak()
        start = time.perf_counter()
        model = random_model(CONFIG, torch.float16, device.device, quantization=mode)
        load_s = time.perf_counter() - start
        load_peak = device.peak_gib()
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30
        input_ids, pixels = _inputs(batch, device.device, torch.float16)
        device.reset_peak()
        with torch.inference_mode():
            model.predict_scores(input_ids, pixels)
        rows.append(
            {
                "mode": mode or "float16",
                "model_gib": round(size, 2),
                "build_peak_gib": load_peak,
                "scoring_peak_gib": device.peak_gib(),
                "build_s": round(load_s, 1),
            }
        )
        logger.info("memory %s", rows[-1])
        del model
    return rows


def _parity_case(parity_dir: Path) -> tuple[list[Path], dict]:
    """The parity images and the original's golden LoRA scores for them (batch 1, scorer prompt)."""
    images = [parity_dir / "images" / name for name in PARITY_IMAGES]
    return images, json.loads((parity_dir / "golden" / "scorer_lora.json").read_text())["batch1"]


def parity(device: Device, shared: Path) -> dict:
    parity_dir = shared / "parity"
    if not parity_dir.is_dir():
        return {"skipped": f"{parity_dir} is absent (pass --shared)"}
    images, golden = _parity_case(parity_dir)
    results = {}
    for name, paths in {"lora": ("qscorer_lora", "base"), "merged": ("qscorer_merged",)}.items():
        scores = {}
        for where in ("cpu", str(device.device)):
            scorer = Scorer(
                *(parity_dir / path for path in paths), device=where, dtype="float32", prompt="scorer", clamp=False
            )
            scores[where] = [result.score for result in scorer.score(images)]
        cpu, other = scores["cpu"], scores[str(device.device)]
        results[name] = {
            "max_cuda_cpu_difference": max(abs(a - b) for a, b in zip(cpu, other)),
            "scores": other,
        }
        if name == "lora":
            results[name]["max_golden_difference"] = max(
                abs(score - golden[image]["score"]) for score, image in zip(other, PARITY_IMAGES)
            )
    results["goal"] = 1e-4
    return results


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)


def _probe_points(model) -> dict[str, torch.nn.Module]:
    layers = model.model.layers
    points = {"vision_model": model.model.vision_model, "visual_abstractor": model.model.visual_abstractor}
    for index in sorted({0, 1, 3, len(layers) // 4, len(layers) // 2, len(layers) - 1} & set(range(len(layers)))):
        points[f"llm_layer_{index}"] = layers[index]
    return points


def batch_invariance(device: Device, size: int = 8) -> list[dict]:
    """Image 0 scored alone and inside a batch of ``size``, per dtype: the score difference, and where the two runs'
    activations part (relative L2 difference of image 0's activations at each probe point, prefill only)."""
    rows = []
    for dtype in (torch.float16, torch.float32):
        model = random_model(CONFIG, dtype, device.device)
        input_ids, pixels = _inputs(size, device.device, dtype, seed=1)
        captured: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for name, module in _probe_points(model).items():

            def keep(module, arguments, output, name=name, captured=captured):
                captured.setdefault(name, []).append(_first_output(output)[0].float().clone())

            hooks.append(module.register_forward_hook(keep))
        with torch.inference_mode():
            together = model.predict_scores(input_ids, pixels).scores.float()
            batched = {name: tensors[0] for name, tensors in captured.items()}
            captured.clear()
            alone = torch.cat(
                [model.predict_scores(input_ids[i : i + 1], pixels[i : i + 1]).scores.float() for i in range(size)]
            )
            single = {name: tensors[0] for name, tensors in captured.items()}
        for hook in hooks:
            hook.remove()
        rows.append(
            {
                "batch": size,
                "dtype": str(dtype).removeprefix("torch."),
                "max_score_difference": float((together - alone).abs().max()),
                "score_range": _range(together),
                "relative_activation_difference": {
                    name: float((batched[name] - single[name]).norm() / single[name].norm()) for name in batched
                },
            }
        )
        logger.info("batch_invariance %s", rows[-1])
        del model
    return rows


def _kernels(device: Device) -> list[str]:
    from qscorer.model.flash import is_flash_attn_available

    flash = device.cuda and is_flash_attn_available()
    return ["eager", "sdpa", *(["flash_attention_2"] if flash else [])]


def attention(device: Device, shared: Path, batch: int) -> dict:
    kernels = _kernels(device)
    input_ids, pixels = _inputs(batch, device.device, torch.bfloat16, seed=2)
    rows, scores = [], {}
    for kernel in kernels:
        model = random_model(CONFIG, torch.bfloat16, device.device, attn_implementation=kernel)
        with torch.inference_mode():
            scores[kernel] = model.predict_scores(input_ids, pixels).scores.float()
            device.reset_peak()
            seconds = device.timed(model.predict_scores, input_ids, pixels)
        rows.append(
            {
                "kernel": kernel,
                "batch": batch,
                "images_per_s": round(batch / seconds, 2),
                "peak_gib": device.peak_gib(),
                "max_score_difference_from_eager": float((scores[kernel] - scores["eager"]).abs().max()),
                "score_range": _range(scores[kernel]),
            }
        )
        logger.info("attention %s", rows[-1])
        del model
    result = {"random_model_bfloat16": rows, "flash_attn_installed": "flash_attention_2" in kernels}
    parity_dir = shared / "parity"
    if not parity_dir.is_dir():
        return {**result, "parity": f"skipped: {parity_dir} is absent (pass --shared)"}
    images, golden = _parity_case(parity_dir)
    checkpoint = (parity_dir / "qscorer_lora", parity_dir / "base")
    result["parity_lora"] = []
    for dtype in ("float32", "bfloat16"):
        for kernel in kernels:
            scorer = Scorer(
                *checkpoint,
                device=str(device.device),
                dtype=dtype,
                attn_implementation=kernel,
                prompt="scorer",
                clamp=False,
            )
            found = [item.score for item in scorer.score(images)]
            result["parity_lora"].append(
                {
                    "dtype": dtype,
                    "kernel": kernel,
                    "max_golden_difference": max(abs(a - golden[n]["score"]) for a, n in zip(found, PARITY_IMAGES)),
                }
            )
    return result


def serve(device: Device, shared: Path, quick: bool) -> dict:
    from bench_serve import Load, make_images, service_row

    from qscorer.data import load_tokenizer

    tokenizer_dir = shared / "reference" / "llama2-tokenizer"
    if not tokenizer_dir.is_dir():
        return {"skipped": f"{tokenizer_dir} is absent (pass --shared)"}
    model = random_model(CONFIG, torch.bfloat16, device.device)
    scorer = Scorer.from_model(model, load_tokenizer(tokenizer_dir), clamp=False)
    # bf16 scores of the random 7B model move with the batch they are computed in (on 2 CPU cores: by more than 0.05
    # for 2 of 11 images between batch 1 and batch 2); fp32 equality is what the serving tests check.
    load = Load(
        clients=4 if quick else 32,
        requests=1 if quick else 4,
        rounds=1,
        max_batch_size=2 if quick else 32,
        tolerance=0.1,
    )
    with tempfile.TemporaryDirectory() as folder:
        row = service_row(CONFIG, scorer, make_images(Path(folder), 64, (512, 512)), load)
    del scorer, model
    return row


def training_step(device: Device, batch: int, layers: int | None) -> dict:
    from qscorer.train.arguments import DataArguments, ModelArguments, TrainingArguments
    from qscorer.train.setup import prepare_for_training

    model_args, data_args = ModelArguments(version="v1"), DataArguments(image_aspect_ratio="pad")
    training_args = TrainingArguments(  # scripts/train_lora.sh's model set-up
        output_dir="/tmp/gpu_check_train",
        lora_enable=True,
        bf16=True,
        use_cpu=not device.cuda,
        gradient_checkpointing=True,
        tune_visual_abstractor=True,
        freeze_vision_model=False,
        weight_next_token=0.05,
        report_to="none",
    )
    config = config_named(CONFIG)
    if layers is not None:
        config.num_hidden_layers = layers
    device.reset_peak()
    model = random_model(config, torch.bfloat16, device.device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model = prepare_for_training(model, model_args, data_args, training_args)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0)
    input_ids, pixels = _inputs(batch, device.device, torch.float32)
    answer = torch.tensor([TRAIN_ANSWER] * batch, device=device.device)
    input_ids = torch.cat([input_ids, answer], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -len(TRAIN_ANSWER) :] = answer
    step_inputs = dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=torch.ones_like(input_ids),
        images=pixels,
        gt_scores=torch.full((batch,), 3.5, device=device.device),
    )

    def step() -> float:
        with torch.autocast(device.device.type, dtype=torch.bfloat16):
            loss = model(input_type="single", task_types=["score"] * batch, **step_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first_loss = step()
    device.sync()
    start = time.perf_counter()
    second_loss = step()
    device.sync()
    seconds = time.perf_counter() - start
    result = {
        "batch": batch,
        "llm_layers": config.num_hidden_layers,
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "step_s": round(seconds, 2),
        "peak_gib": device.peak_gib(),
        "losses": [first_loss, second_loss],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder with parity/")
    parser.add_argument("--quick", action="store_true", help="batch 1 everywhere, fewer LLM layers for training")
    parser.add_argument("--config", default="7b", help="architecture (tiny / mid for a smoke run of the script)")
    parser.add_argument("--train-layers", type=int, default=None, help="LLM layers of the training step model")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["throughput", "memory", "parity", "batch_invariance", "attention", "serve", "training_step"],
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    global CONFIG
    CONFIG = args.config
    device = Device(args.device)
    batches = [1] if args.quick else [1, 8, 32]
    layers = args.train_layers if args.train_layers is not None else (2 if args.quick else None)
    sections = {
        "throughput": lambda: throughput(device, batches, repeats=1 if args.quick else 3),
        "memory": lambda: memory(device, 1 if args.quick else 8),
        "parity": lambda: parity(device, args.shared),
        "batch_invariance": lambda: batch_invariance(device, 2 if args.quick else 8),
        "attention": lambda: attention(device, args.shared, 1 if args.quick else 8),
        "serve": lambda: serve(device, args.shared, args.quick),
        "training_step": lambda: training_step(device, 1 if args.quick else 16, layers),
    }
    report = {
        "device": torch.cuda.get_device_name(device.device) if device.cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "quick": args.quick,
        "sections": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in args.sections:
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                result = sections[name]()
        except Exception as error:  # one failing section must not lose the others
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report["sections"][name] = {"seconds": round(time.perf_counter() - start, 1), "result": result}
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        logger.info("%s done in %.0f s", name, time.perf_counter() - start)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
