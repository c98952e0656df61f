"""``qscorer demo``: synth -> train (from the shipped tiny base) -> infer -> eval on CPU, then a summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import QScorerError


def add_arguments(parser) -> None:
    from ..demo import DEMO_EPOCHS, DEMO_NUM_TEST, DEMO_NUM_TRAIN

    parser.add_argument("--out", default="demo_out", help="output folder (replaced if it holds a previous demo)")
    parser.add_argument("--num-train", type=int, default=DEMO_NUM_TRAIN)
    parser.add_argument("--num-test", type=int, default=DEMO_NUM_TEST)
    parser.add_argument("--epochs", type=float, default=DEMO_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="base model folder to fine-tune (default: the shipped tiny base)")


def run(args) -> int:
    from ..demo import run_demo
    from ..demo_base import SHIPPED_BASE

    base = Path(args.base) if args.base else SHIPPED_BASE
    if not (base / "config.json").is_file():
        raise QScorerError(f"--base {base} is not a model folder (no config.json)")
    out = Path(args.out)
    if out.exists():
        if not (out / "demo.json").exists():
            raise QScorerError(f"{out} exists and is not a previous demo output: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"status": "running"}, allow_nan=False) + "\n")
    summary = run_demo(
        out, num_train=args.num_train, num_test=args.num_test, epochs=args.epochs, seed=args.seed, base=base
    )
    (out / "demo.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    metrics = summary["metrics"]
    print(
        "\nqscorer demo: a TINY model (LLM width 64, vision encoder pretrained to describe distortions) fine-tuned for "
        f"{summary['seconds']['train']:.0f} s on CPU on synthetic distortions."
    )
    print("It shows the pipeline working end to end; it says nothing about Q-Scorer's accuracy on real images.")
    correlations = "   ".join(f"{key} {_number(metrics[key])}" for key in ("SRCC", "PLCC"))
    print(f"  held-out images: {metrics['n']}   {correlations}   (prompt: {summary['prompt']})")
    print(f"  predictions:     {summary['predictions']}")
    print(f"  scatter plot:    {summary['plot']}")
    print(f"  checkpoint:      {summary['checkpoint']}")
    print(
        f"  score an image:  qscorer score --model-path {summary['checkpoint']} --prompt {summary['prompt']} "
        "fig/sample.jpg"
    )
    return 0


def _number(value) -> str:
    return "undefined (constant predictions)" if value is None else f"{value:.3f}"
