"""One command line for every job: ``qscorer <command> [options]``.

Each command has a module in this package with ``add_arguments(parser)`` and ``run(args) -> int``; it parses the
options and calls the Python API (``qscorer.scoring``, ``qscorer.inference``, ...), which holds no argparse code.
A command's module is imported only when that command runs, so ``qscorer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import QScorerError

COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("qscorer.cli.score", "score images, folders or globs with a Q-Scorer checkpoint"),
    "infer": ("qscorer.cli.infer", "batch inference over test metas (JSON lines per meta, resumable)"),
    "eval": ("qscorer.cli.eval", "SRCC / PLCC / KRCC / RMSE of predictions against ground-truth metas"),
    "train": ("qscorer.cli.train", "LoRA fine-tuning (the original's flags)"),
    "merge": ("qscorer.cli.merge", "merge a LoRA checkpoint into a self-contained model folder"),
    "synth": ("qscorer.cli.synth", "build a synthetic IQA dataset from bundled photos"),
    "serve": ("qscorer.cli.serve", "an HTTP scoring service with dynamic batching and a web page"),
    "demo": ("qscorer.cli.demo", "the whole pipeline on a tiny model, on CPU, with no download"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument tree; only the chosen command's module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="qscorer", description="Q-Scorer image quality assessment.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command and return its exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # bitsandbytes (the quant extra) warns at import, on CPUs with AVX512-BF16, that an optional kernel download
    # failed; it falls back to its own kernel, so the warning is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except QScorerError as error:
        print(f"qscorer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
