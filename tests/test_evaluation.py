"""qscorer eval: parity with the original's cal_plcc_srcc.py, hand-computed metrics, id matching, outputs, CLI."""

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import OptimizeWarning

from qscorer import evaluation
from qscorer.cli import main
from qscorer.errors import QScorerError
from qscorer.evaluation import (
    LogisticFit,
    compute_metrics,
    evaluate_predictions,
    logistic,
    logistic_fit,
    pair_by_id,
    read_records,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-computed example: x = 1..5, y = [2, 1, 4, 3, 5]. Deviations from the means (3, 3): x -2 -1 0 1 2,
# y -1 -2 1 0 2; sum of products 8, sums of squares 10 and 10, so PLCC = 0.8; the ranks are the values, so
# SRCC = 0.8; of the 10 pairs, (1,2) and (3,4) are discordant, so KRCC = (8 - 2) / 10 = 0.6; x - y = -1 1 -1 1 0,
# so RMSE = sqrt(4 / 5).
HAND_X = [1.0, 2.0, 3.0, 4.0, 5.0]
HAND_Y = [2.0, 1.0, 4.0, 3.0, 5.0]
HAND_RAW = {"SRCC": 0.8, "PLCC": 0.8, "KRCC": 0.6, "RMSE": math.sqrt(0.8)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def make_dataset(folder, name, n=30, seed=0):
    """A prediction file (JSON lines named .json, like the original's) and its GT meta (a JSON list)."""
    rng = np.random.default_rng(seed)
    mos = rng.uniform(1, 5, n)
    score = 3 + 1.5 * np.tanh((mos - 3) / 1.2) + rng.normal(0, 0.3, n)
    ids = [f"{name}/img_{index:03d}.jpg" for index in range(n)]
    gt = [{"id": i, "image": i, "gt_score": float(m)} for i, m in zip(ids, mos)]
    preds = [{"id": i, "image": i, "gt_score": float(m), "score": float(s)} for i, m, s in zip(ids, mos, score)]
    folder.mkdir(parents=True, exist_ok=True)
    return write_jsonl(folder / f"{name}.json", preds), write_json(folder / f"gt_{name}.json", gt)


def failed_fit(*args, **kwargs):
    raise RuntimeError("Optimal parameters not found: Number of calls to function has reached maxfev = 10000.")


# --------------------------------------------------------------------------------------------------------------------
# Parity with the original


def test_golden_srcc_plcc_match_the_original(golden_dir):
    expected = json.loads((golden_dir / "eval_plcc_srcc.json").read_text())
    metrics = evaluate_predictions(golden_dir / "eval_pred.jsonl", golden_dir / "eval_gt.json")
    assert metrics["SRCC"] == pytest.approx(expected["SRCC"], abs=1e-9)
    assert metrics["PLCC"] == pytest.approx(expected["PLCC"], abs=1e-9)
    assert metrics["n"] == 200 and metrics["fit_converged"]
    # PLCC is taken after the fit: it differs from the raw Pearson correlation that the harness also recorded.
    assert abs(metrics["PLCC"] - expected["harness_raw_pearson_no_fit"]) > 1e-4


def test_golden_matched_by_id_when_the_order_differs(golden_dir, tmp_path):
    expected = json.loads((golden_dir / "eval_plcc_srcc.json").read_text())
    preds = read_records(golden_dir / "eval_pred.jsonl")
    shuffled = [preds[index] for index in np.random.default_rng(3).permutation(len(preds))]
    metrics = evaluate_predictions(write_json(tmp_path / "shuffled.json", shuffled), golden_dir / "eval_gt.json")
    assert metrics["SRCC"] == pytest.approx(expected["SRCC"], abs=1e-9)
    assert metrics["PLCC"] == pytest.approx(expected["PLCC"], abs=1e-9)


def test_fit_uses_the_original_initial_values_and_budget(monkeypatch):
    calls = []
    original_curve_fit = evaluation.curve_fit

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original_curve_fit(*args, **kwargs)

    monkeypatch.setattr(evaluation, "curve_fit", spy)
    x = [0.0, 2.0, 4.0, 6.0, 8.0, 4.0]
    y = [1.0, 1.5, 3.0, 4.5, 5.0, 2.5]
    logistic_fit(x, y)
    # max(y) 5, min(y) 1, mean(x) 4, population std(x) = sqrt((16 + 4 + 0 + 4 + 16 + 0) / 6), divided by 4.
    assert calls[0]["p0"] == pytest.approx([5.0, 1.0, 4.0, math.sqrt(40 / 6) / 4])
    assert calls[0]["maxfev"] == 10000 and "method" not in calls[0]


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def test_logistic_formula():
    # (b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2 at x = b3 is the midpoint; far right b1, far left b2.
    assert logistic(np.array([2.0]), 5.0, 1.0, 2.0, 0.5)[0] == pytest.approx(3.0)
    assert logistic(np.array([2.5]), 5.0, 1.0, 2.0, 0.5)[0] == pytest.approx(4 / (1 + math.exp(-1)) + 1)
    assert logistic(np.array([1e6, -1e6]), 5.0, 1.0, 2.0, 0.5) == pytest.approx([5.0, 1.0])


def test_perfectly_monotone_predictions_rank_perfectly():
    x = np.linspace(0, 1, 12)
    metrics = compute_metrics(x, np.exp(3 * x))
    assert metrics["SRCC"] == pytest.approx(1.0) and metrics["KRCC"] == pytest.approx(1.0)
    assert metrics["n"] == 12


def test_fit_recovers_an_exact_logistic_and_metrics_use_the_fitted_values():
    x = np.linspace(-3, 3, 25)
    y = logistic(x, 4.5, 1.2, 0.4, 0.7)
    fit = logistic_fit(x, y)
    assert fit.converged
    assert fit.params == pytest.approx((4.5, 1.2, 0.4, 0.7), abs=1e-5)
    metrics = compute_metrics(x, y)
    assert metrics["PLCC"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["RMSE"] == pytest.approx(0.0, abs=1e-6)
    assert np.corrcoef(x, y)[0, 1] < 0.98  # the raw correlation is visibly lower


def test_hand_computed_raw_metrics():
    metrics = compute_metrics(HAND_X, HAND_Y, LogisticFit(None, "not fitted"))
    for key, value in HAND_RAW.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics["n"] == 5 and metrics["fit_converged"] is False


def test_hand_computed_fitted_metrics_with_a_given_fit():
    # With b1=5, b2=1, b3=3, b4=1 the fitted value at x=3 is 3; the ranks are unchanged, so SRCC stays 0.8.
    fit = LogisticFit((5.0, 1.0, 3.0, 1.0))
    fitted = [4 / (1 + math.exp(-(x - 3))) + 1 for x in HAND_X]
    metrics = compute_metrics(HAND_X, HAND_Y, fit)
    assert metrics["SRCC"] == pytest.approx(0.8)
    assert metrics["PLCC"] == pytest.approx(np.corrcoef(fitted, HAND_Y)[0, 1], abs=1e-12)
    assert metrics["RMSE"] == pytest.approx(math.sqrt(np.mean((np.array(fitted) - HAND_Y) ** 2)), abs=1e-12)


def test_compute_metrics_rejects_bad_arrays():
    with pytest.raises(ValueError, match="same length"):
        compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        compute_metrics([1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        compute_metrics([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------------------------------------------------
# Non-convergence


def test_curve_fit_failure_falls_back_to_raw_metrics_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(evaluation, "curve_fit", failed_fit)
    fit = logistic_fit(HAND_X, HAND_Y)
    assert not fit.converged and "maxfev" in fit.failure and fit.params is None
    with pytest.raises(ValueError, match="did not converge"):
        fit.predict(HAND_X)
    with caplog.at_level(logging.WARNING, logger="qscorer.evaluation"):
        metrics = compute_metrics(HAND_X, HAND_Y, name="my_preds")
    assert metrics["fit_converged"] is False
    for key, value in HAND_RAW.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert "my_preds" in caplog.text and "did not converge" in caplog.text


def test_optimize_warning_counts_as_not_converged(monkeypatch):
    def warns(function, x, y, p0, maxfev):
        warnings.warn("Covariance of the parameters could not be estimated", OptimizeWarning, stacklevel=2)
        return np.array(p0), np.full((4, 4), np.inf)

    monkeypatch.setattr(evaluation, "curve_fit", warns)
    fit = logistic_fit(np.arange(6.0), np.arange(6.0) ** 2)
    assert not fit.converged and "Covariance" in fit.failure


@pytest.mark.parametrize(
    ("params", "reason"),
    [((5.0, 1.0, 3.0, 0.0), "not finite"), ((2.0, 2.0, 3.0, 1.0), "constant")],
)
def test_degenerate_fitted_curve_counts_as_not_converged(monkeypatch, params, reason):
    monkeypatch.setattr(evaluation, "curve_fit", lambda *args, **kwargs: (np.array(params), np.eye(4)))
    fit = logistic_fit([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 3.0, 2.0, 4.0, 6.0, 5.0])
    assert not fit.converged and reason in fit.failure


def test_real_degenerate_data_falls_back_without_crashing():
    # Constant predictions: the fit degenerates (b4 starts at 0) and the correlations are undefined.
    metrics = compute_metrics([2.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert metrics["fit_converged"] is False and math.isnan(metrics["SRCC"]) and math.isnan(metrics["PLCC"])
    # Four points cannot determine four parameters.
    assert "4 points" in logistic_fit([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]).failure


# --------------------------------------------------------------------------------------------------------------------
# Reading and matching records


def test_records_read_by_content_not_by_suffix(tmp_path):
    records = [{"id": "a", "score": 1.0}, {"id": "b", "score": 2.0}]
    assert read_records(write_jsonl(tmp_path / "lines.json", records)) == records
    assert read_records(write_json(tmp_path / "list.jsonl", records)) == records
    (tmp_path / "pretty.json").write_text(json.dumps(records, indent=2))
    assert read_records(tmp_path / "pretty.json") == records
    (tmp_path / "gaps.jsonl").write_text("\n" + json.dumps(records[0]) + "\n\n" + json.dumps(records[1]))
    assert read_records(tmp_path / "gaps.jsonl") == records


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "score": 1}\n{"id": "b", "sco', "line 2: not valid JSON"),
        ("", "no records"),
        ("[1, 2]", "record 1 is a JSON int"),
        ('[{"id": "a"', "not valid JSON"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(QScorerError, match=message) as error:
        read_records(path)
    assert str(path) in str(error.value)
    with pytest.raises(QScorerError, match="no such file"):
        read_records(tmp_path / "absent.json")


def test_differing_ids_are_listed_with_the_files():
    gt = [{"id": name, "gt_score": 1.0} for name in ["a", "b", "c"]]
    preds = [{"id": name, "score": 1.0} for name in ["a", "c", "z"]]
    with pytest.raises(QScorerError) as error:
        pair_by_id(preds, gt, pred_name="preds.json", gt_name="meta.json")
    message = str(error.value)
    assert message.startswith("preds.json: ids differ from meta.json")
    assert "1 missing (in meta.json, not predicted): b" in message
    assert "1 extra (predicted, not in meta.json): z" in message


def test_long_id_listings_are_truncated_with_counts():
    gt = [{"id": f"img_{index}", "gt_score": 1.0} for index in range(1000)]
    preds = gt[:10]
    with pytest.raises(QScorerError) as error:
        pair_by_id([{**record, "score": 1.0} for record in preds], gt)
    message = str(error.value)
    assert "990 missing" in message and "img_10, img_11" in message and "... and 985 more" in message
    assert "img_999" not in message and len(message) < 300


@pytest.mark.parametrize("side", ["pred", "gt"])
def test_duplicate_ids_are_errors(side):
    records = [{"id": name, "score": 1.0, "gt_score": 2.0} for name in ["a", "b", "a", "c"]]
    unique = [{"id": name, "score": 1.0, "gt_score": 2.0} for name in ["a", "b", "c"]]
    preds, gt = (records, unique) if side == "pred" else (unique, records)
    with pytest.raises(QScorerError, match=f"{side}.json: 1 duplicate id\\(s\\): a"):
        pair_by_id(preds, gt, pred_name="pred.json", gt_name="gt.json")


def test_records_without_an_id_are_errors():
    with pytest.raises(QScorerError, match='p.json: record 2 has no usable "id"'):
        pair_by_id([{"id": "a", "score": 1}, {"score": 2}], [{"id": "a", "gt_score": 1}], pred_name="p.json")


def test_pairs_follow_ground_truth_order_and_accept_numeric_strings():
    gt = [{"id": "b", "gt_score": "2.5"}, {"id": "a", "gt_score": 4}, {"id": "c", "gt_score": 1.0}]
    preds = [{"id": "a", "score": 3.0}, {"id": "c", "score": "0.5"}, {"id": "b", "score": 2}]
    scores = pair_by_id(preds, gt)
    assert scores.ids == ["b", "a", "c"]
    assert scores.predictions.tolist() == [2.0, 3.0, 0.5] and scores.mos.tolist() == [2.5, 4.0, 1.0]
    with pytest.raises(QScorerError, match=r"gt.json: record 2 \(id 'a'\): gt_score 'high' is not a finite number"):
        pair_by_id(preds, [*gt[:1], {"id": "a", "gt_score": "high"}, gt[2]], gt_name="gt.json")


def test_failed_prediction_records_stop_by_default_and_are_skipped_on_request(caplog):
    gt = [{"id": f"i{index}", "gt_score": float(index % 5)} for index in range(8)]
    preds = [{"id": f"i{index}", "score": float(index % 5) + 0.1 * index} for index in range(8)]
    preds[2] = {"id": "i2", "image": "i2.jpg", "error": "OSError: cannot identify image file"}
    preds[5] = {"id": "i5", "score": None}
    with pytest.raises(QScorerError) as error:
        pair_by_id(preds, gt, pred_name="p.json")
    message = str(error.value)
    assert message.startswith("p.json: 2 prediction record(s) failed")
    assert "i2 (error: OSError: cannot identify image file)" in message and "i5 (score None" in message
    assert "--skip-failed" in message

    with caplog.at_level(logging.WARNING, logger="qscorer.evaluation"):
        scores = pair_by_id(preds, gt, pred_name="p.json", skip_failed=True)
    assert scores.ids == ["i0", "i1", "i3", "i4", "i6", "i7"]
    assert set(scores.excluded) == {"i2", "i5"}
    assert "leaving out 2 failed prediction record(s)" in caplog.text


def test_skipped_records_leave_the_same_metrics_as_a_clean_file(tmp_path):
    pred_path, gt_path = make_dataset(tmp_path, "set", n=40)
    preds = read_records(pred_path)
    clean = evaluate_predictions(write_jsonl(tmp_path / "clean.json", preds[3:]), write_json(tmp_path / "gt3.json",
                                                                                            read_records(gt_path)[3:]))
    broken = [{"id": record["id"], "error": "CUDA out of memory"} for record in preds[:3]] + preds[3:]
    skipped = evaluate_predictions(write_jsonl(tmp_path / "broken.json", broken), gt_path, skip_failed=True)
    assert skipped == pytest.approx(clean, abs=1e-12)
    assert skipped["n"] == 37


def test_disagreeing_gt_copies_in_predictions_are_warned_about(tmp_path, caplog):
    pred_path, gt_path = make_dataset(tmp_path, "set", n=10)
    preds = read_records(pred_path)
    preds[4]["gt_score"] += 1.0
    with caplog.at_level(logging.WARNING, logger="qscorer.evaluation"):
        evaluate_predictions(write_jsonl(pred_path, preds), gt_path)
    assert "gt_score differs" in caplog.text and "set/img_004.jpg" in caplog.text


def test_too_few_usable_records_is_an_error():
    with pytest.raises(QScorerError, match="1 usable record"):
        pair_by_id([{"id": "a", "score": 1.0}], [{"id": "a", "gt_score": 1.0}], pred_name="p.json")


# --------------------------------------------------------------------------------------------------------------------
# Output files and plots


RESULTS = {
    "test_koniq_2k": {"SRCC": 0.95, "PLCC": 0.961234567, "KRCC": 0.81, "RMSE": 0.25, "n": 2015, "fit_converged": True},
    "test_csiq_866": {"SRCC": 0.7, "PLCC": 0.75, "KRCC": 0.5, "RMSE": 0.5, "n": 866, "fit_converged": False},
}


def test_json_output(tmp_path):
    write_results(RESULTS, tmp_path / "sub" / "results.json")
    assert json.loads((tmp_path / "sub" / "results.json").read_text()) == RESULTS


def test_json_output_writes_nan_as_null(tmp_path):
    write_results({"flat": {**RESULTS["test_csiq_866"], "SRCC": float("nan")}}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["flat"]["SRCC"] is None


def test_csv_output(tmp_path):
    write_results(RESULTS, tmp_path / "results.csv")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [row["dataset"] for row in rows] == list(RESULTS)
    for row in rows:
        expected = RESULTS[row["dataset"]]
        metrics = {key: float(row[key]) for key in evaluation.METRICS}
        assert metrics == {key: expected[key] for key in evaluation.METRICS}
        assert int(row["n"]) == expected["n"] and row["fit_converged"] == str(expected["fit_converged"])


def test_markdown_output(tmp_path):
    write_results(RESULTS, tmp_path / "results.md")
    lines = (tmp_path / "results.md").read_text().splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:4]]
    assert cells[0] == ["dataset", "SRCC", "PLCC", "KRCC", "RMSE", "n"]
    assert all(set(cell) <= set("-:") for cell in cells[1])
    assert cells[2] == ["test_koniq_2k", "0.9500", "0.9612", "0.8100", "0.2500", "2015"]
    assert cells[3] == ["test_csiq_866*", "0.7000", "0.7500", "0.5000", "0.5000", "866"]
    assert lines[-1].startswith("*: the logistic fit did not converge")


def test_unknown_output_suffix_is_an_error(tmp_path):
    with pytest.raises(QScorerError, match="unknown result format .txt"):
        write_results(RESULTS, tmp_path / "results.txt")


def test_scatter_plots_are_pngs_next_to_the_results_file(tmp_path):
    pred_a, gt_a = make_dataset(tmp_path / "data", "test_a", seed=1)
    pred_b, gt_b = make_dataset(tmp_path / "data", "test_b", seed=2)
    out = tmp_path / "res" / "results.md"
    argv = ["eval", "--pred_paths", str(pred_a), str(pred_b), "--gt_paths", str(gt_a), str(gt_b), "--out", str(out)]
    assert main(argv) == 0
    for name in ["test_a", "test_b"]:
        assert (tmp_path / "res" / "results_plots" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_dir_options(tmp_path, monkeypatch):
    pred, gt = make_dataset(tmp_path / "data", "test_a")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--pred-paths", str(pred), "--gt-paths", str(gt)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert main(["eval", "--pred_paths", str(pred), "--gt_paths", str(gt), "--plot-dir", "figs"]) == 0
    assert (tmp_path / "figs" / "test_a.png").read_bytes().startswith(PNG_SIGNATURE)
    assert main(["eval", "--pred_paths", str(pred), "--gt_paths", str(gt), "--out", "r.json", "--no-plots"]) == 0
    assert not (tmp_path / "r_plots").exists()


def test_plot_for_a_failed_fit_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "curve_fit", failed_fit)
    pred, gt = make_dataset(tmp_path, "test_a")
    assert main(["eval", "--pred_paths", str(pred), "--gt_paths", str(gt), "--plot-dir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "test_a.png").read_bytes().startswith(PNG_SIGNATURE)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end_on_the_golden_pair(golden_dir, tmp_path, capsys):
    expected = json.loads((golden_dir / "eval_plcc_srcc.json").read_text())
    out = tmp_path / "results.json"
    argv = ["eval", "--pred_paths", str(golden_dir / "eval_pred.jsonl"), "--gt_paths", str(golden_dir / "eval_gt.json"),
            "--out", str(out), "--no-plots"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[1:-1] == [" dataset   ", "   SRCC ", "   PLCC ", "   KRCC ", "   RMSE ", "   n "]
    assert table[2].startswith("| eval_pred | 0.9576 | 0.9643 |") and table[2].endswith("| 200 |")
    result = json.loads(out.read_text())["eval_pred"]
    assert result["SRCC"] == pytest.approx(expected["SRCC"], abs=1e-9)
    assert result["PLCC"] == pytest.approx(expected["PLCC"], abs=1e-9)


def test_cli_names_datasets_by_stem_and_keeps_repeats_apart(tmp_path, capsys):
    pred, gt = make_dataset(tmp_path, "test_koniq_2k")
    out = tmp_path / "results.json"
    assert main(["eval", "--pred_paths", str(pred), str(pred), "--gt_paths", str(gt), str(gt), "--out", str(out),
                 "--no-plots"]) == 0
    assert list(json.loads(out.read_text())) == ["test_koniq_2k", "test_koniq_2k-2"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gt_paths", "{gt}", "{gt}"], "--pred_paths has 1 file(s) but --gt_paths has 2"),
        (["--gt_paths", "{gt}", "--out", "{tmp}/r.txt"], "unknown result format .txt"),
        (["--gt_paths", "{tmp}/absent.json"], "absent.json: no such file"),
        (["--gt_paths", "{other_gt}"], "ids differ from"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    pred, gt = make_dataset(tmp_path, "test_a")
    _, other_gt = make_dataset(tmp_path / "other", "test_b")
    extra = [arg.format(gt=gt, tmp=tmp_path, other_gt=other_gt) for arg in extra]
    assert main(["eval", "--pred_paths", str(pred), *extra, "--no-plots"]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("qscorer eval: error: ") and message in stderr[0]


def test_cli_skip_failed(tmp_path, capsys):
    pred, gt = make_dataset(tmp_path, "test_a", n=20)
    preds = read_records(pred)
    preds[0] = {"id": preds[0]["id"], "error": "decode failed"}
    write_jsonl(pred, preds)
    assert main(["eval", "--pred_paths", str(pred), "--gt_paths", str(gt), "--no-plots"]) == 2
    assert "--skip-failed" in capsys.readouterr().err
    assert main(["eval", "--pred_paths", str(pred), "--gt_paths", str(gt), "--no-plots", "--skip-failed"]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("| 19 |")


def test_module_imports_without_torch():
    code = "import sys, qscorer.evaluation; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------------------------
# scripts/eval_score.sh

SCRIPT = REPO / "scripts" / "eval_score.sh"
TEST_SETS = [
    ("koniq", "test_koniq_2k"),
    ("spaq", "test_spaq_2k"),
    ("kadid10k", "test_kadid_2k"),
    ("LIVE-WILD", "test_livew_1k"),
    ("AGIQA3K", "test_agiqa_3k"),
    ("csiq", "test_csiq_866"),
]


@pytest.fixture
def script_env():
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    env = {key: value for key, value in os.environ.items() if key not in ("DATA_ROOT", "RESULTS_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_eval_script_prints_usage_without_data_root(script_env):
    result = subprocess.run(["bash", str(SCRIPT)], env=script_env, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: DATA_ROOT=")


def test_eval_script_evaluates_the_six_test_sets(tmp_path, script_env):
    results_dir = tmp_path / "results"
    for seed, (folder, name) in enumerate(TEST_SETS):
        pred, gt = make_dataset(results_dir, name, n=12, seed=seed)
        (tmp_path / "data" / folder / "metas").mkdir(parents=True)
        gt.rename(tmp_path / "data" / folder / "metas" / f"{name}.json")
    env = {**script_env, "DATA_ROOT": str(tmp_path / "data"), "RESULTS_DIR": str(results_dir)}
    result = subprocess.run(["bash", str(SCRIPT), "--no-plots"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = (results_dir / "results.md").read_text()
    assert result.stdout == table
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [name for _, name in TEST_SETS]
