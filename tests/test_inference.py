"""Batch inference: the original's output format, failure records, crash-safe resume, sharding across processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from tiny import save_tiny_checkpoint

from qscorer.cli import main
from qscorer.errors import QScorerError
from qscorer.inference import load_test_records, read_json_lines

RECORD_KEYS = {"id", "image", "gt_score", "logits", "score"}


def test_batch_inference_reproduces_the_original_iqa_eval(parity_dir, golden_dir, parity_images_dir, tmp_path):
    golden = [json.loads(line) for line in (golden_dir / "iqa_eval_lora_bs1.jsonl").read_text().splitlines()]
    for batch_size in ("1", "3"):
        save_dir = tmp_path / f"bs{batch_size}"
        status = main(
            [
                "infer",
                "--model-path",
                str(parity_dir / "qscorer_lora"),
                "--model-base",
                str(parity_dir / "base"),
                "--meta-paths",
                str(golden_dir / "iqa_eval_test_meta.json"),
                "--root-dir",
                str(parity_images_dir),
                "--save-dir",
                str(save_dir),
                "--batch-size",
                batch_size,
                "--with-prob",
                "True",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--num-workers",
                "0",
            ]
        )
        assert status == 0
        lines = read_json_lines(save_dir / "iqa_eval_test_meta.json")
        assert [line["id"] for line in lines] == [record["id"] for record in golden]
        for line, expected in zip(lines, golden, strict=True):
            assert set(line) == RECORD_KEYS | {"probs"}
            assert (line["image"], line["gt_score"]) == (expected["image"], expected["gt_score"])
            assert line["score"] == pytest.approx(expected["score"], abs=1e-5)
            assert list(line["logits"]) == list(expected["logits"])
            for token, value in expected["logits"].items():
                assert line["logits"][token] == pytest.approx(value, abs=1e-5)
                assert line["probs"][token] == pytest.approx(expected["probs"][token], rel=1e-4)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_infer"), seed=41)


def make_dataset(folder, count: int, broken=()):
    """``count`` small PNGs and a meta listing them (records in ``broken`` point at unreadable files)."""
    (folder / "images").mkdir(parents=True)
    generator = torch.Generator().manual_seed(count)
    records = []
    for index in range(count):
        name = f"images/img_{index:03d}.png"
        if index in broken:
            (folder / name).write_bytes(b"broken")
        else:
            pixels = (torch.rand(24 + index % 5, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name)
        records.append({"id": f"img_{index:03d}->{index / 10:.1f}", "image": name, "gt_score": index / 10})
    meta = folder / "test_meta.json"
    meta.write_text(json.dumps(records))
    return meta


def infer_arguments(model, meta, root, save_dir, *extra):
    return [
        "infer",
        "--model-path",
        str(model),
        "--meta-paths",
        str(meta),
        "--root-dir",
        str(root),
        "--save-dir",
        str(save_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra,
    ]


def test_failures_are_recorded_and_the_run_goes_on(tiny_folder, tmp_path, caplog):
    meta = make_dataset(tmp_path, 5, broken={1, 3})
    assert main(infer_arguments(tiny_folder, meta, tmp_path, tmp_path / "out", "--batch-size", "2")) == 2
    lines = read_json_lines(tmp_path / "out" / "test_meta.json")
    assert [line["id"] for line in lines] == [record.id for record in load_test_records(meta)]
    assert [("error" in line) for line in lines] == [False, True, False, True, False]
    assert "img_001.png" in lines[1]["error"] and set(lines[0]) == RECORD_KEYS
    assert not list((tmp_path / "out").glob(".*part*"))

    (tmp_path / "images" / "img_001.png").unlink()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "images" / "img_001.png")
    assert main(infer_arguments(tiny_folder, meta, tmp_path, tmp_path / "out", "--retry-failed")) == 2
    retried = read_json_lines(tmp_path / "out" / "test_meta.json")
    assert [("error" in line) for line in retried] == [False, False, False, True, False]
    assert retried[0] == lines[0] and len(retried) == 5


def test_an_incomplete_last_line_is_dropped(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text('{"id": "a", "score": 1.0}\n{"id": "b", "sco')
    assert read_json_lines(path) == [{"id": "a", "score": 1.0}]
    assert path.read_text() == '{"id": "a", "score": 1.0}\n'


def test_meta_validation_names_the_file_and_record(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"id": "a", "image": "x.png"}, {"id": "b"}]))
    with pytest.raises(QScorerError, match=r"meta.json, record 1: missing or non-string 'image'"):
        load_test_records(meta)
    meta.write_text(json.dumps([{"id": "a", "image": "x.png"}, {"id": "a", "image": "y.png"}]))
    with pytest.raises(QScorerError, match="id 'a' repeats record 0"):
        load_test_records(meta)
    meta.write_text('{"image": "x.png", "gt_score": "high"}\n')
    with pytest.raises(QScorerError, match="record 0: gt_score 'high' is not a finite number"):
        load_test_records(meta)
    meta.write_text('{"img_path": "x.png"}\n')
    assert load_test_records(meta)[0].id == "x.png"


def _cli(*arguments):
    return [sys.executable, "-m", "qscorer", *arguments]


def test_resume_after_sigkill_neither_loses_nor_duplicates(tiny_folder, tmp_path):
    meta = make_dataset(tmp_path, 40)
    reference = tmp_path / "reference"
    assert main(infer_arguments(tiny_folder, meta, tmp_path, reference, "--batch-size", "2")) == 0

    resumed = tmp_path / "resumed"
    arguments = infer_arguments(tiny_folder, meta, tmp_path, resumed, "--batch-size", "2", "--num-workers", "2")[:]
    process = subprocess.Popen(_cli(*arguments), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = resumed / ".test_meta.json.part0"
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or part.read_text().count("\n") < 6):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = part.read_text().count("\n")
    assert 6 <= written < 40, "the run was not interrupted in the middle"
    assert not (resumed / "test_meta.json").exists()

    assert main(infer_arguments(tiny_folder, meta, tmp_path, resumed, "--batch-size", "2")) == 0
    expected = read_json_lines(reference / "test_meta.json")
    actual = read_json_lines(resumed / "test_meta.json")
    assert [line["id"] for line in actual] == [line["id"] for line in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert got["logits"] == pytest.approx(want["logits"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_give_the_records_of_one(tiny_folder, tmp_path):
    meta = make_dataset(tmp_path, 7, broken={4})
    single = tmp_path / "single"
    assert main(infer_arguments(tiny_folder, meta, tmp_path, single, "--batch-size", "2")) == 2
    sharded = tmp_path / "sharded"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "qscorer",
        *infer_arguments(tiny_folder, meta, tmp_path, sharded, "--batch-size", "2", "--num-workers", "0"),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert (sharded / "test_meta.json").is_file(), result.stderr[:6000]
    expected = read_json_lines(single / "test_meta.json")
    actual = read_json_lines(sharded / "test_meta.json")
    assert [line["id"] for line in actual] == [line["id"] for line in expected]
    for got, want in zip(actual, expected, strict=True):
        assert ("error" in got) == ("error" in want)
        if "score" in want:
            assert got["score"] == pytest.approx(want["score"], abs=1e-6)
    assert not list(sharded.glob(".*part*"))
