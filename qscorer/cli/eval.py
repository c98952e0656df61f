"""``qscorer eval``: SRCC / PLCC / KRCC / RMSE of prediction files against ground-truth metas.

Prints the table; ``--out`` also writes it (.md / .csv / .json) with one scatter plot per dataset next to it
(``<out stem>_plots/``); ``--plot-dir`` chooses the plots' folder. With neither, nothing is written.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import QScorerError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``qscorer eval`` (the original's --pred_paths / --gt_paths, plus output options)."""
    parser.add_argument(
        "--pred_paths",
        "--pred-paths",
        nargs="+",
        required=True,
        metavar="PRED",
        help='prediction files (JSON lines or a JSON list of {"id", "score", ...}); the dataset name is the stem',
    )
    parser.add_argument(
        "--gt_paths",
        "--gt-paths",
        nargs="+",
        required=True,
        metavar="GT",
        help='ground-truth metas (JSON list or JSON lines of {"id", "gt_score", ...}), paired with PRED by position',
    )
    parser.add_argument(
        "--skip-failed",
        action="store_true",
        help='leave out, with a warning, prediction records with an "error" field or no numeric score '
        "(default: stop with an error)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="also write the results; the suffix picks the format: .md, .csv, .json"
    )
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument(
        "--plot-dir",
        "--plots-dir",
        type=Path,
        metavar="DIR",
        help="folder for one scatter plot PNG per dataset (default: <out stem>_plots next to --out; no plots without "
        "--out)",
    )
    plots.add_argument("--no-plots", action="store_true", help="write no scatter plots")


def run(args: argparse.Namespace) -> int:
    """Evaluate each prediction file against its ground truth, print the table, write the results and plots."""
    from ..evaluation import evaluate_file, format_table, result_format, save_scatter_plot, write_results

    if len(args.pred_paths) != len(args.gt_paths):
        raise QScorerError(
            f"--pred_paths has {len(args.pred_paths)} file(s) but --gt_paths has {len(args.gt_paths)}; "
            "they are paired by position"
        )
    if args.out is not None:
        result_format(args.out)
    evaluations = [
        evaluate_file(pred_path, gt_path, dataset=name, skip_failed=args.skip_failed)
        for pred_path, gt_path, name in zip(args.pred_paths, args.gt_paths, _dataset_names(args.pred_paths))
    ]
    results = {evaluation.dataset: evaluation.metrics for evaluation in evaluations}
    print(format_table(results), end="")
    if args.out is not None:
        write_results(results, args.out)
        logger.info("wrote %s", args.out)
    plot_dir = _plot_dir(args)
    if plot_dir is not None:
        for evaluation in evaluations:
            save_scatter_plot(evaluation, plot_dir / f"{evaluation.dataset}.png")
        logger.info("wrote %d scatter plot(s) to %s", len(evaluations), plot_dir)
    return 0


def _plot_dir(args: argparse.Namespace) -> Path | None:
    """``--plot-dir``, else ``<out stem>_plots`` next to ``--out`` (results.md -> results_plots/), else None."""
    if args.no_plots:
        return None
    if args.plot_dir is not None:
        return args.plot_dir
    return None if args.out is None else args.out.with_name(f"{args.out.stem}_plots")


def _dataset_names(pred_paths: Sequence[str | Path]) -> list[str]:
    """Prediction file stems, with "-2", "-3", ... appended to repeats so that every dataset has its own row."""
    names: list[str] = []
    for path in pred_paths:
        stem = Path(path).stem
        name, copy = stem, 2
        while name in names:
            name, copy = f"{stem}-{copy}", copy + 1
        names.append(name)
    return names
