"""Loading the published release's formats: peak memory, bytes read and wall time, printed as JSON.

    python benchmarks/make_synthetic_release.py /tmp/release --size 7b --merged   # once (~62 GB of disk)
    python benchmarks/bench_loading.py /tmp/release [--dtype bfloat16] [--cases lora merged lora-8bit ...]

Each case runs in a fresh process that loads the model and scores one image:

- ``lora``: qscorer's loader on ``release/lora`` + ``release/base`` (lean: memory-mapped reads, each tensor once);
- ``lora-8bit`` / ``lora-4bit``: the same with ``load_8bit`` / ``load_4bit``;
- ``merged``: qscorer's loader on ``release/merged``;
- ``lora-naive``: the previous path (and the original builder's): ``from_pretrained`` of the base, then the whole
  ``non_lora_trainables.bin`` read into memory on top of it, then the LoRA merge;
- ``merged-naive``: transformers' ``from_pretrained`` of the merged folder.

A naive case is skipped, with the reason, when its estimated peak exceeds the memory available. Reported per case:
peak ``RssAnon`` (what the kernel cannot drop; sampled every 5 ms from /proc/self/status), peak ``RssFile`` (clean
pages of memory-mapped files, which it can) and RssAnon after the imports (the baseline); the model's size in the
target dtype and the ratio of peak RssAnon to it; bytes read (the loader's count of tensor bytes, and the kernel's
read_bytes / rchar); load and scoring seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "fig" / "sample.jpg"
CASES = ("lora", "merged", "lora-8bit", "lora-4bit", "lora-naive", "merged-naive")


class MemorySampler(threading.Thread):
    """Peak RssAnon / RssFile of this process, sampled from /proc/self/status."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            for key, value in _status().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.join()
        return {f"peak_{key}_gb": round(value / 1e9, 3) for key, value in self.peak.items()}


def _status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _io() -> dict[str, int]:
    return {
        key: int(value) for key, value in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    }


def _model_bytes(model) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])


def load_naive_lora(release: Path, dtype):
    """The loader before lean loading: base built in memory, then the whole non_lora file read on top of it."""
    import torch

    from qscorer.checkpoints import model_key
    from qscorer.constants import SCORE_TOKENS
    from qscorer.data.tokenization import load_tokenizer, score_token_ids
    from qscorer.loading import LoraAdapter
    from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM

    tokenizer = load_tokenizer(release / "base")
    config = MPLUGOwl2Config.from_pretrained(release / "lora")
    config.vocab_size = MPLUGOwl2Config.from_pretrained(release / "base").vocab_size
    model = MPLUGOwl2LlamaForCausalLM.from_pretrained(release / "base", config=config, dtype=dtype)
    model.add_score_tokens(score_token_ids(tokenizer), SCORE_TOKENS)
    state = torch.load(release / "lora" / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    model.load_state_dict({model_key(key): value for key, value in state.items()}, strict=False)
    del state
    adapter = LoraAdapter.read(release / "lora")
    with torch.no_grad():
        for module_name in adapter.pairs:
            layer = model.get_submodule(module_name)
            layer.weight.copy_((layer.weight.float() + adapter.delta(module_name, layer.weight.device)).to(dtype))
    return tokenizer, model.eval()


def child(case: str, release: Path, dtype_name: str, device: str) -> dict:
    """Load and score in this process; returns the measurements."""
    import torch

    from qscorer.loading import DTYPES
    from qscorer.scoring import Scorer

    baseline = _status()["RssAnon"]
    sampler = MemorySampler()
    sampler.start()
    io_before = _io()
    start = time.perf_counter()

    dtype = DTYPES[dtype_name]
    if case == "lora-naive":
        tokenizer, model = load_naive_lora(release, dtype)
        scorer = Scorer.from_model(model.to(device), tokenizer)
    elif case == "merged-naive":
        from qscorer.data.tokenization import load_tokenizer
        from qscorer.model import MPLUGOwl2LlamaForCausalLM

        model = MPLUGOwl2LlamaForCausalLM.from_pretrained(release / "merged", dtype=dtype, device_map=device).eval()
        scorer = Scorer.from_model(model, load_tokenizer(release / "merged"))
    else:
        paths = (release / "merged",) if case == "merged" else (release / "lora", release / "base")
        options = {"load_8bit": case.endswith("8bit"), "load_4bit": case.endswith("4bit")}
        scorer = Scorer(*paths, device=device, dtype=dtype, **options)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    score = scorer([IMAGE])[0]
    score_seconds = time.perf_counter() - start
    io_after = _io()
    memory = sampler.stop()
    model_gb = _model_bytes(scorer.model) / 1e9
    report = getattr(scorer.model, "load_report", None)
    result = {
        "case": case,
        "dtype": dtype_name,
        "device": device,
        "model_gb": round(model_gb, 3),
        "baseline_RssAnon_gb": round(baseline / 1e9, 3),
        **memory,
        "anon_over_model": round(memory["peak_RssAnon_gb"] / model_gb, 3),
        "tensor_bytes_read_gb": None if report is None else round(sum(report.bytes_read.values()) / 1e9, 3),
        "kernel_read_bytes_gb": round((io_after["read_bytes"] - io_before["read_bytes"]) / 1e9, 3),
        "kernel_rchar_gb": round((io_after["rchar"] - io_before["rchar"]) / 1e9, 3),
        "load_s": round(load_seconds, 1),
        "score_s": round(score_seconds, 1),
        "score": score,
        "torch_threads": torch.get_num_threads(),
    }
    return result


def _estimated_naive_peak_gb(case: str, release: Path, dtype_name: str) -> float:
    """Model size in the target dtype, plus the whole non_lora file for the LoRA case."""
    itemsize = 4 if dtype_name in ("float32", "fp32") else 2
    merged = sum(path.stat().st_size for path in (release / "merged").glob("*.safetensors"))
    model = (
        merged / 2 * itemsize
        if merged
        else (release / "lora" / "non_lora_trainables.bin").stat().st_size / 2 * itemsize
    )
    extra = (release / "lora" / "non_lora_trainables.bin").stat().st_size if case == "lora-naive" else 0
    return (model + extra) / 1e9


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", type=Path, help="folder written by make_synthetic_release.py")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.release, args.dtype, args.device)))
        return 0
    results = []
    for case in args.cases:
        needed = case.startswith("merged") and not (args.release / "merged").is_dir()
        if needed:
            results.append({"case": case, "skipped": "no merged folder (make_synthetic_release.py --merged)"})
            continue
        if case.endswith("naive"):
            estimate, available = _estimated_naive_peak_gb(case, args.release, args.dtype), _available_gb()
            if estimate > 0.9 * available:
                results.append({"case": case, "skipped": f"needs ~{estimate:.1f} GB, {available:.1f} GB available"})
                continue
        command = [
            sys.executable,
            __file__,
            str(args.release),
            "--child",
            case,
            "--dtype",
            args.dtype,
            "--device",
            args.device,
        ]
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if run.returncode != 0:
            results.append({"case": case, "failed": run.returncode, "stderr": run.stderr[-2000:]})
        else:
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"release": str(args.release), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
