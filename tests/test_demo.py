"""``qscorer demo`` end to end at a small size: every step runs through the CLI and the outputs are consistent."""

import json

from qscorer.cli import main
from qscorer.demo import tiny_config


def test_demo_runs_the_pipeline_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--num-train", "16", "--num-test", "8", "--epochs", "1"])
    assert status == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["metrics"]["n"] == 8 and set(summary["seconds"]) == {
        "synth",
        "tiny base model",
        "train",
        "infer",
        "eval",
    }
    predictions = [json.loads(line) for line in (out / "results" / "test.json").read_text().splitlines()]
    assert len(predictions) == 8 and all("score" in record for record in predictions)
    assert (out / "results" / "plots" / "test.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "TINY model" in printed and "says nothing about Q-Scorer's accuracy" in printed

    (out / "results" / "stale.txt").write_text("previous run")
    assert main(["demo", "--out", str(out), "--num-train", "16", "--num-test", "8", "--epochs", "1"]) == 0
    assert not (out / "results" / "stale.txt").exists()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a previous demo output" in capsys.readouterr().err and (tmp_path / "mine.txt").exists()


def test_tiny_config_scales_the_init_with_the_width():
    config = tiny_config(512)
    assert config.initializer_range == 64**-0.5 and config.vision_config.patch_size == 28
    assert config.abstractor_config.grid_size == 16 and config.vision_config.image_size == 448
