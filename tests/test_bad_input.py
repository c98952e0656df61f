"""Bad metas and bad numbers: empty metas, non-finite gt_score in every command, non-finite model outputs, and
strict JSON in every file qscorer writes."""

import ast
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_inference import infer_arguments, make_dataset
from tiny import save_tiny_checkpoint

from qscorer.cli import main
from qscorer.data.datasets import load_meta
from qscorer.errors import QScorerError
from qscorer.evaluation import pair_by_id
from qscorer.inference import load_test_records

PACKAGE = Path(__file__).resolve().parents[1] / "qscorer"


def strict_json(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity (Python's json module reads them by default)."""

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bad_input"), seed=43)


@pytest.mark.parametrize("content", ["[]", "", "\n  \n"])
def test_an_empty_meta_gives_an_empty_output_and_exit_0(tiny_folder, tmp_path, content, caplog):
    (tmp_path / "empty.json").write_text(content)
    save_dir = tmp_path / "new" / "results"  # created even though nothing is scored
    assert main(infer_arguments(tiny_folder, tmp_path / "empty.json", tmp_path, save_dir)) == 0
    assert (save_dir / "empty.json").read_text() == ""
    assert "has no records: writing an empty" in caplog.text


@pytest.mark.parametrize("gt_score", ["NaN", "Infinity", "-Infinity", '"nan"', '"inf"', "true"])
def test_non_finite_gt_score_is_refused_with_the_record_index(tmp_path, gt_score):
    good = '{"id": "a", "image": "a.png", "gt_score": 3.5}'
    bad = f'{{"id": "b", "image": "b.png", "gt_score": {gt_score}}}'
    (tmp_path / "meta.json").write_text(f"[{good}, {bad}]")
    with pytest.raises(QScorerError, match=r"meta.json, record 1: gt_score .* is not a finite number"):
        load_test_records(tmp_path / "meta.json")
    with pytest.raises(QScorerError, match=r"gt.json: record 2 \(id 'b'\): gt_score .* is not a finite number"):
        pair_by_id([{"id": "a", "score": 1.0}, {"id": "b", "score": 2.0}], json.loads(f"[{good}, {bad}]"),
                   gt_name="gt.json")
    conversation = '[{"from": "human", "value": "<|image|>Rate."}, {"from": "gpt", "value": "Good."}]'
    (tmp_path / "train.json").write_text(f'[{{"image": "b.png", "conversations": {conversation}, '
                                         f'"gt_score": {gt_score}}}]')
    with pytest.raises(QScorerError, match=r"train.json record 0: 'gt_score' must be a finite number"):
        load_meta(tmp_path / "train.json")


def test_infer_and_score_refuse_a_nan_meta_on_the_command_line(tiny_folder, tmp_path, capsys):
    Image.new("RGB", (30, 20), (9, 99, 199)).save(tmp_path / "a.png")
    (tmp_path / "meta.json").write_text('[{"image": "a.png", "gt_score": 1}, {"image": "a.png", "id": "x", '
                                        '"gt_score": NaN}]')
    assert main(infer_arguments(tiny_folder, tmp_path / "meta.json", tmp_path, tmp_path / "out")) == 2
    assert "record 1: gt_score nan is not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    """A tiny checkpoint whose head outputs NaN: the score of every image is NaN."""
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_nan"), seed=44)
    weights = load_file(folder / "model.safetensors")
    weights["deepmlp.output_layer.bias"] = torch.full_like(weights["deepmlp.output_layer.bias"], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_non_finite_model_outputs_are_failures_never_numbers(nan_folder, tmp_path, capsys):
    meta = make_dataset(tmp_path, 3)
    assert main(infer_arguments(nan_folder, meta, tmp_path, tmp_path / "out", "--with-prob")) == 2
    lines = [strict_json(line) for line in (tmp_path / "out" / "test_meta.json").read_text().splitlines()]
    assert len(lines) == 3 and all(set(line) == {"id", "image", "gt_score", "error"} for line in lines)
    assert all(f"{line['image']}: the model gave a non-finite score" in line["error"] for line in lines)
    capsys.readouterr()

    image = str(tmp_path / "images" / "img_000.png")
    arguments = ["score", image, "--model-path", str(nan_folder), "--device", "cpu", "--dtype", "float32"]
    assert main([*arguments, "--format", "json"]) == 2
    output = capsys.readouterr()
    [record] = strict_json(output.out)
    assert (record["image"], record["score"], record["logits"], record["token_id"]) == (image, None, None, None)
    assert record["error"] == f"{image}: the model gave a non-finite score (nan); check the checkpoint and the dtype"
    assert f"qscorer score: error: {image}: the model gave a non-finite score" in output.err


def _json_writes(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("dump", "dumps")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
            yield node


def test_every_json_write_in_qscorer_refuses_non_finite_numbers():
    """Every ``json.dump`` / ``json.dumps`` in the package passes ``allow_nan=False``: a NaN that slipped through
    raises instead of writing a file that is not JSON."""
    found, lenient = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _json_writes(ast.parse(path.read_text(encoding="utf-8"))):
            found += 1
            strict = any(keyword.arg == "allow_nan" and isinstance(keyword.value, ast.Constant)
                         and keyword.value.value is False for keyword in call.keywords)
            if not strict:
                lenient.append(f"{path.relative_to(PACKAGE.parent)}:{call.lineno}")
    assert found >= 10 and lenient == []
