"""Fuzz: damaged files of every supported format, random bytes, a decompression bomb and extreme shapes through
``qscorer score`` and ``qscorer infer`` (2 decoding workers each), in a child process whose address space is limited,
so that a regression that pads an extreme shape to its square (40 GB) fails here instead of exhausting the machine."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import damaged_corpus
from test_bad_input import strict_json
from tiny import save_tiny_checkpoint

HEADROOM = 3 << 30
"""Address space the child may grow by after importing torch and qscorer (its peak RSS stays far below)."""

DRIVER = """
import contextlib, json, resource, sys

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

import torch  # imported before the baseline is taken
from qscorer.cli import main
from qscorer import inference, scoring

plan = json.loads(sys.argv[1])
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize:") + plan["headroom"], hard))
report = {"baseline_rss": status("VmRSS:"), "status": {}, "output": {}}
for name, argv, stdout in plan["runs"]:
    with open(stdout, "w") as stream, contextlib.redirect_stdout(stream):
        report["status"][name] = main(argv)
    if name != "score":
        report["output"][name] = open(plan["output"]).read()
report["peak_rss"] = status("VmHWM:")
report["workers_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """The corpus (fixed seed), a meta of it, and one child process running score, infer, infer again (resume) and
    infer --retry-failed; returns the paths and the child's report."""
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_checkpoint(root / "model", seed=47)
    inputs = [*damaged_corpus(root / "images", seed=0), root / "images" / "missing.png"]
    meta = root / "meta.json"
    meta.write_text(json.dumps([{"id": f"r{index}", "image": str(path.relative_to(root)), "gt_score": index % 5}
                                for index, path in enumerate(inputs)] + [{"id": "folder", "image": "images"}]))
    common = ["--model-path", str(model), "--device", "cpu", "--dtype", "float32", "--num-workers", "2",
              "--batch-size", "4"]
    infer = ["infer", *common, "--meta-paths", str(meta), "--root-dir", str(root), "--save-dir", str(root / "out")]
    runs = [
        ("score", ["score", *map(str, inputs), *common, "--format", "json"], str(root / "score.json")),
        ("infer", infer, str(root / "infer.log")),
        ("resume", infer, str(root / "resume.log")),
        ("retry", [*infer, "--retry-failed"], str(root / "retry.log")),
    ]
    plan = {"headroom": HEADROOM, "runs": runs, "output": str(root / "out" / "meta.json")}
    child = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(plan)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return {"root": root, "inputs": inputs, "report": json.loads(child.stdout.splitlines()[-1]),
            "stderr": child.stderr}


def test_score_reports_every_file_and_names_every_failure(fuzz_run):
    assert fuzz_run["report"]["status"]["score"] == 2
    records = strict_json((fuzz_run["root"] / "score.json").read_text())
    assert [record["image"] for record in records] == [str(path) for path in fuzz_run["inputs"]]
    failed = [record for record in records if "error" in record]
    for record in records:
        if "error" in record:
            assert record["image"] in record["error"] and record["score"] is None
            assert f"qscorer score: error: {record['error']}" in fuzz_run["stderr"]
        else:
            assert math.isfinite(record["score"]) and 0.0 <= record["score"] <= 5.0
    names = {Path(record["image"]).name for record in failed}
    assert {"bomb.png", "empty.png", "random.jpg", "missing.png"} <= names
    assert "intact.jpg" not in names and "column_1x100000.png" not in names and "row_100000x1.png" not in names
    assert 10 <= len(failed) <= len(records) - 10  # the corpus mixes readable and unreadable files


def test_infer_records_every_meta_record_and_resumed_runs_finish(fuzz_run):
    status = fuzz_run["report"]["status"]
    assert (status["infer"], status["resume"], status["retry"]) == (2, 2, 2)
    output = fuzz_run["report"]["output"]
    lines = [strict_json(line) for line in output["infer"].splitlines()]
    assert [line["id"] for line in lines] == [f"r{index}" for index in range(len(fuzz_run["inputs"]))] + ["folder"]
    for line in lines:
        if "error" in line:
            assert line["image"] in line["error"]
        else:
            assert math.isfinite(line["score"]) and all(math.isfinite(value) for value in line["logits"].values())
    assert "IsADirectoryError" in lines[-1]["error"] and "decompression bomb" in next(
        line["error"] for line in lines if line["image"].endswith("bomb.png"))
    # A rerun and a retry of the failures end with the same file: no record lost, none duplicated.
    assert output["resume"] == output["infer"] and output["retry"] == output["infer"]
    assert not list((fuzz_run["root"] / "out").glob(".*"))


def test_peak_memory_stays_bounded(fuzz_run):
    # The address-space limit already stopped any allocation past HEADROOM; the peaks stay far below it (the 1 x
    # 100000 and 100000 x 1 images would need a 40 GB square on the original's path).
    report = fuzz_run["report"]
    assert report["peak_rss"] - report["baseline_rss"] < 1 << 30
    assert report["workers_peak_rss"] < 2 << 30


def test_a_1_x_100000_png_costs_at_most_200_mb():
    """The benchmark's child process under a 1 GiB address-space limit: decoding and preprocessing the PNG (the
    original pads it to a 100000 x 100000 square, 40 GB) stays within 200 MB above the baseline."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile_images.py"
    run = subprocess.run([sys.executable, str(script), "--cases", "column_1x100000", "--paths",
                          "qscorer", "--limit-mb", "1024"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)["cases"]["column_1x100000"]["qscorer"]
    assert result["outcome"] == "ok" and result["peak_rss_above_baseline_mb"] < 200
