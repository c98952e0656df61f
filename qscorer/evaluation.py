"""SRCC / PLCC / KRCC / RMSE of predicted scores against ground-truth MOS (``qscorer eval`` runs it).

Re-implements the original ``src/evaluate/cal_plcc_srcc.py``: a 4-parameter logistic maps the predictions
onto the MOS scale, and SRCC and PLCC are computed on the fitted predictions, so on the same records the numbers equal
the original's. What changes (README "Differences from the original code", "Evaluation"):

- records are matched by id instead of zipped by position, and differing id sets or duplicate ids are errors;
- prediction records that failed (an ``"error"`` field) or lack a numeric score stop the evaluation, or are left out
  with a warning under ``--skip-failed``;
- a logistic fit that fails (curve_fit raises or warns, or the fitted curve is non-finite or constant, or there are
  at most 4 points) is reported, and PLCC / KRCC / RMSE fall back to the raw predictions;
- KRCC, RMSE and n are reported as well, as a table, an optional .md / .csv / .json file and scatter plots.

This module needs numpy, scipy and (for plots, imported lazily) matplotlib; it never imports torch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.stats import kendalltau, pearsonr, spearmanr

from .data.records import finite_number, read_json_records
from .errors import QScorerError

logger = logging.getLogger(__name__)

METRICS = ("SRCC", "PLCC", "KRCC", "RMSE")
"""The reported metrics, in table order (each result also holds "n" and "fit_converged")."""

MAXFEV = 10000
"""curve_fit's function-evaluation budget, as in the original."""

RESULT_FORMATS = (".md", ".csv", ".json")
"""Suffixes accepted by ``--out``; the suffix picks the format."""

_MAX_LISTED = 5
_MAX_REASON_CHARS = 80


# --------------------------------------------------------------------------------------------------------------------
# Reading and matching records


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON list or JSON-lines file; the content decides which, not the suffix."""
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise QScorerError(f"{path}: no records")
    for index, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise QScorerError(f"{path}: record {index} is a JSON {type(record).__name__}, expected an object")
    return records


@dataclass(frozen=True)
class PairedScores:
    """Predictions and MOS matched by id, in ground-truth order; ``excluded`` maps left-out ids to the reason."""

    ids: list[Any]
    predictions: np.ndarray
    mos: np.ndarray
    excluded: dict[Any, str]


def pair_by_id(
    pred_records: Sequence[dict[str, Any]],
    gt_records: Sequence[dict[str, Any]],
    *,
    pred_name: str = "predictions",
    gt_name: str = "ground truth",
    skip_failed: bool = False,
) -> PairedScores:
    """Match prediction "score" to ground-truth "gt_score" by "id"; bad input raises QScorerError naming the files.

    The id sets must be equal and free of duplicates. A prediction record with an "error" field or without a finite
    numeric "score" is an error, or with ``skip_failed`` is left out (with a warning). Numbers may be JSON numbers or
    numeric strings (Q-Align style metas store gt_score as a string).
    """
    predictions = _index_by_id(pred_records, pred_name)
    ground_truth = _index_by_id(gt_records, gt_name)
    _check_same_ids(predictions, ground_truth, pred_name, gt_name)

    mos = {}
    for index, record in enumerate(gt_records, 1):
        mos[record["id"]] = finite_number(record.get("gt_score"))
        if mos[record["id"]] is None:
            raise QScorerError(f"{gt_name}: record {index} (id {record['id']!r}): gt_score "
                               f"{record.get('gt_score')!r} is not a finite number")

    excluded = {record_id: reason for record_id, record in predictions.items() if (reason := _failure(record))}
    if excluded:
        listing = _list_items([f"{record_id} ({reason})" for record_id, reason in excluded.items()])
        if not skip_failed:
            raise QScorerError(
                f"{pred_name}: {len(excluded)} prediction record(s) failed or have no numeric score: {listing}; "
                "rerun inference for them, or leave them out with --skip-failed (skip_failed=True)"
            )
        logger.warning("%s: leaving out %d failed prediction record(s): %s", pred_name, len(excluded), listing)

    ids = [record_id for record_id in ground_truth if record_id not in excluded]
    if len(ids) < 2:
        raise QScorerError(f"{pred_name}: {len(ids)} usable record(s); at least 2 are needed for correlations")
    _warn_on_gt_disagreement(predictions, mos, ids, pred_name, gt_name)
    return PairedScores(
        ids=ids,
        predictions=np.array([finite_number(predictions[record_id]["score"]) for record_id in ids]),
        mos=np.array([mos[record_id] for record_id in ids]),
        excluded=excluded,
    )


def _index_by_id(records: Sequence[dict[str, Any]], source: str) -> dict[Any, dict[str, Any]]:
    by_id: dict[Any, dict[str, Any]] = {}
    duplicates: dict[Any, None] = {}
    for index, record in enumerate(records, 1):
        record_id = record.get("id")
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int, float)):
            raise QScorerError(f"{source}: record {index} has no usable \"id\" (got {record_id!r})")
        if record_id in by_id:
            duplicates[record_id] = None
        else:
            by_id[record_id] = record
    if duplicates:
        raise QScorerError(f"{source}: {len(duplicates)} duplicate id(s): {_list_items(list(duplicates))}")
    return by_id


def _check_same_ids(predictions: dict, ground_truth: dict, pred_name: str, gt_name: str) -> None:
    missing = [record_id for record_id in ground_truth if record_id not in predictions]
    extra = [record_id for record_id in predictions if record_id not in ground_truth]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (in {gt_name}, not predicted): {_list_items(missing)}")
    if extra:
        problems.append(f"{len(extra)} extra (predicted, not in {gt_name}): {_list_items(extra)}")
    if problems:
        raise QScorerError(f"{pred_name}: ids differ from {gt_name}: " + "; ".join(problems))


def _failure(record: dict[str, Any]) -> str | None:
    """Why a prediction record cannot be scored, or None when it can."""
    if record.get("error") is not None:
        return _shorten(f"error: {record['error']}")
    if "score" not in record:
        return "no score"
    if finite_number(record["score"]) is None:
        return _shorten(f"score {record['score']!r} is not a finite number")
    return None


def _warn_on_gt_disagreement(predictions: dict, mos: dict, ids: list, pred_name: str, gt_name: str) -> None:
    """Prediction files repeat gt_score; a disagreement hints that they were made from another version of the meta."""
    differing = []
    for record_id in ids:
        copied = finite_number(predictions[record_id].get("gt_score"))
        if copied is not None and not math.isclose(copied, mos[record_id], rel_tol=1e-6, abs_tol=1e-9):
            differing.append(f"{record_id} ({copied} vs {mos[record_id]})")
    if differing:
        logger.warning(
            "%s: gt_score differs from %s for %d record(s): %s; using the ground-truth file's values",
            pred_name,
            gt_name,
            len(differing),
            _list_items(differing),
        )


def _list_items(items: Sequence[Any]) -> str:
    """The first few items, comma-separated, then '... and N more'."""
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# Logistic fit and metrics


def logistic(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The original's 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / b4)) + b2


@dataclass(frozen=True)
class LogisticFit:
    """The fitted (b1, b2, b3, b4), and ``failure`` saying why the fit is unusable (None when it converged)."""

    params: tuple[float, float, float, float] | None
    failure: str | None = None

    @property
    def converged(self) -> bool:
        return self.failure is None

    def predict(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted curve at ``x``; ValueError when the fit did not converge."""
        if not self.converged:
            raise ValueError(f"the logistic fit did not converge: {self.failure}")
        return logistic(np.asarray(x, dtype=np.float64), *self.params)


def logistic_fit(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> LogisticFit:
    """Fit :func:`logistic` mapping predictions ``x`` to MOS ``y`` exactly like the original.

    Initial [max(y), min(y), mean(x), std(x) / 4] (population std), scipy curve_fit with its default method and
    maxfev 10000. The fit counts as failed when curve_fit raises or emits an OptimizeWarning, when the fitted curve is
    non-finite or constant on ``x``, or when there are no more points than the 4 parameters.
    """
    x, y = _as_arrays(x, y)
    if x.size <= 4:
        return LogisticFit(None, f"{x.size} points cannot determine 4 parameters")
    initial = [np.max(y), np.min(y), np.mean(x), np.std(x) / 4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OptimizeWarning)
        try:
            params, _ = curve_fit(logistic, x, y, p0=initial, maxfev=MAXFEV)
        except (RuntimeError, ValueError) as error:
            return LogisticFit(None, str(error))
    params = tuple(float(value) for value in params)
    optimize_warnings = [str(item.message) for item in caught if issubclass(item.category, OptimizeWarning)]
    if optimize_warnings:
        return LogisticFit(params, optimize_warnings[0])
    fitted = logistic(x, *params)
    if not np.all(np.isfinite(fitted)):
        return LogisticFit(params, "the fitted curve is not finite")
    if np.ptp(fitted) <= 1e-12 * np.max(np.abs(fitted)):
        return LogisticFit(params, "the fitted curve is constant")
    return LogisticFit(params)


def compute_metrics(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    fit: LogisticFit | None = None,
    *,
    name: str = "predictions",
) -> dict[str, Any]:
    """{"SRCC", "PLCC", "KRCC", "RMSE", "n", "fit_converged"} of predictions ``x`` against MOS ``y``.

    All four metrics use the logistic-fitted predictions (``fit``, computed when not given), as the original does
    for SRCC and PLCC; when the fit failed they use the raw predictions and a warning names ``name``. Constant
    inputs give NaN correlations (with a warning).
    """
    x, y = _as_arrays(x, y)
    fit = logistic_fit(x, y) if fit is None else fit
    if fit.converged:
        fitted = fit.predict(x)
    else:
        logger.warning(
            "%s: the logistic fit did not converge (%s); PLCC, KRCC and RMSE use the raw predictions", name, fit.failure
        )
        fitted = x
    if np.ptp(fitted) == 0 or np.ptp(y) == 0:
        logger.warning("%s: the predictions or the MOS are constant; the correlations are undefined (NaN)", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's constant-input warnings, reported above
        return {
            "SRCC": float(spearmanr(fitted, y).statistic),
            "PLCC": float(pearsonr(fitted, y).statistic),
            "KRCC": float(kendalltau(fitted, y).statistic),
            "RMSE": float(np.sqrt(np.mean((fitted - y) ** 2))),
            "n": int(x.size),
            "fit_converged": fit.converged,
        }


def _as_arrays(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"at least 2 points are needed, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    return x, y


# --------------------------------------------------------------------------------------------------------------------
# Evaluating files


@dataclass(frozen=True)
class Evaluation:
    """One prediction file evaluated against its ground truth: the matched scores, the fit and the metrics."""

    dataset: str
    pred_path: Path
    gt_path: Path
    scores: PairedScores
    fit: LogisticFit
    metrics: dict[str, Any]


def evaluate_file(
    pred_path: str | Path, gt_path: str | Path, *, dataset: str | None = None, skip_failed: bool = False
) -> Evaluation:
    """Read, match, fit and measure one prediction file; ``dataset`` defaults to the prediction file's stem."""
    pred_path, gt_path = Path(pred_path), Path(gt_path)
    scores = pair_by_id(
        read_records(pred_path),
        read_records(gt_path),
        pred_name=str(pred_path),
        gt_name=str(gt_path),
        skip_failed=skip_failed,
    )
    logger.info("%s: %d records matched by id with %s", pred_path, len(scores.ids), gt_path)
    fit = logistic_fit(scores.predictions, scores.mos)
    metrics = compute_metrics(scores.predictions, scores.mos, fit, name=str(pred_path))
    return Evaluation(dataset or pred_path.stem, pred_path, gt_path, scores, fit, metrics)


def evaluate_predictions(pred_path: str | Path, gt_path: str | Path, *, skip_failed: bool = False) -> dict[str, Any]:
    """{"SRCC", "PLCC", "KRCC", "RMSE", "n", "fit_converged"} of one prediction file against its ground-truth meta."""
    return evaluate_file(pred_path, gt_path, skip_failed=skip_failed).metrics


# --------------------------------------------------------------------------------------------------------------------
# Output


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, dataset × (SRCC, PLCC, KRCC, RMSE, n), 4 decimals; "*" marks a failed logistic fit."""
    header = ["dataset", *METRICS, "n"]
    rows = [
        [
            name + ("" if metrics["fit_converged"] else "*"),
            *(f"{metrics[key]:.4f}" for key in METRICS),
            str(metrics["n"]),
        ]
        for name, metrics in results.items()
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        aligned = (cell.rjust(width) if column else cell.ljust(width) for column, (cell, width) in enumerate(
            zip(cells, widths)))
        return "| " + " | ".join(aligned) + " |"

    rule = line(["-" * widths[0], *("-" * (width - 1) + ":" for width in widths[1:])])
    lines = [line(header), rule, *(line(row) for row in rows)]
    if not all(metrics["fit_converged"] for metrics in results.values()):
        lines += ["", "*: the logistic fit did not converge; PLCC, KRCC and RMSE are on the raw predictions."]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Write ``results`` (dataset -> metrics) as Markdown, CSV or JSON, chosen by the suffix of ``path``."""
    path = Path(path)
    suffix = result_format(path)
    if suffix == ".md":
        text = format_table(results)
    elif suffix == ".csv":
        text = _format_csv(results)
    else:
        strict = {name: _json_safe(metrics) for name, metrics in results.items()}
        text = json.dumps(strict, indent=2, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise QScorerError(f"{path}: cannot write: {error}") from error


def result_format(path: Path) -> str:
    """The format suffix of a results path (.md, .csv or .json); another suffix is an error naming the path."""
    suffix = path.suffix.lower()
    if suffix not in RESULT_FORMATS:
        raise QScorerError(f"{path}: unknown result format {suffix or '(no suffix)'}; use {', '.join(RESULT_FORMATS)}")
    return suffix


def _format_csv(results: dict[str, dict[str, Any]]) -> str:
    """One row per dataset, floats at full precision (repr)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", *METRICS, "n", "fit_converged"])
    for name, metrics in results.items():
        writer.writerow([name, *(repr(metrics[key]) for key in METRICS), metrics["n"], metrics["fit_converged"]])
    return buffer.getvalue()


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (undefined correlations) and infinities become null, since JSON has neither."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in metrics.items()}


def save_scatter_plot(evaluation: Evaluation, path: str | Path) -> None:
    """A PNG scatter of prediction vs MOS with the fitted logistic, titled with the dataset, SRCC, PLCC and n."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, y, metrics = evaluation.scores.predictions, evaluation.scores.mos, evaluation.metrics
    figure = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(x, y, s=8, alpha=0.6, label="images")
    if evaluation.fit.converged:
        grid = np.linspace(x.min(), x.max(), 200)
        axes.plot(grid, evaluation.fit.predict(grid), color="tab:red", label="logistic fit")
    fit_note = "" if evaluation.fit.converged else ", fit failed"
    axes.set_title(
        f"{evaluation.dataset}\nSRCC {metrics['SRCC']:.4f}  PLCC {metrics['PLCC']:.4f}  (n = {metrics['n']}{fit_note})",
        fontsize=10,
    )
    axes.set_xlabel("predicted score")
    axes.set_ylabel("MOS (gt_score)")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    except OSError as error:
        raise QScorerError(f"{path}: cannot write the plot: {error}") from error
