"""Merge / export: a self-contained folder that plain transformers loads and scores with, without qscorer."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_checkpoint

from qscorer.cli import main
from qscorer.export import write_remote_code
from qscorer.loading import load_pretrained_model
from qscorer.scoring import Scorer

REPO = Path(__file__).resolve().parents[1]

WITHOUT_QSCORER = """
import json, sys
class HideQScorer:
    def find_spec(self, name, path=None, target=None):
        if name == "qscorer" or name.startswith("qscorer."):
            raise ImportError("qscorer is hidden in this test")
sys.meta_path.insert(0, HideQScorer())
import torch
from PIL import Image
from transformers import AutoModelForCausalLM
folder, images = sys.argv[1], sys.argv[2:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
assert "qscorer" not in type(model).__module__, type(model).__module__
print(json.dumps({"scores": model.score([Image.open(path) for path in images]), "class": type(model).__name__}))
"""


def score_without_qscorer(folder, images, tmp_path) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_QSCORER, str(folder), *map(str, images)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_is_the_model_package_copied_unchanged(tmp_path):
    """Shipped modules import only each other (one dot) and a few packages; the modeling file imports every one of
    them itself, because transformers 4.x copies from a local folder only the modeling file's own imports."""
    allowed = {
        "__future__",
        "collections",
        "dataclasses",
        "functools",
        "itertools",
        "json",
        "logging",
        "math",
        "os",
        "pathlib",
        "typing",
        "numpy",
        "PIL",
        "torch",
        "transformers",
        "flash_attn",
    }
    written = write_remote_code(tmp_path)
    shipped = {path.stem for path in written}
    assert {"modeling", "configuration", "image_processing", "resample", "processing", "errors"} <= shipped
    assert "__init__" not in shipped
    for path in written:
        assert path.read_bytes() == (REPO / "qscorer" / "model" / path.name).read_bytes(), path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in shipped, (path.name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] in allowed for alias in node.names), (path.name, ast.dump(node))
    modeling = ast.parse((tmp_path / "modeling.py").read_text())
    imported = {node.module for node in modeling.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert imported == shipped - {"modeling"}


def test_merged_lora_folder_scores_with_plain_transformers(parity_dir, parity_images_dir, golden_dir, tmp_path):
    output = tmp_path / "merged"
    status = main(
        [
            "merge",
            "--model-path",
            str(parity_dir / "qscorer_lora"),
            "--model-base",
            str(parity_dir / "base"),
            "--output-dir",
            str(output),
            "--torch-dtype",
            "float32",
        ]
    )
    assert status == 0
    config = json.loads((output / "config.json").read_text())
    assert config["score_token_id"] == [32004, 32003, 32002, 32001, 32000]
    assert config["score_tokens"] == ["<score1>", "<score2>", "<score3>", "<score4>", "<score5>"]
    assert config["deepmlp_hidden_dims"] == [64, 32] and config["vocab_size"] == 32005
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.MPLUGOwl2LlamaForCausalLM"
    for name in (
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "score_prompts.json",
    ):
        assert (output / name).is_file(), name
    _, reloaded, _, _ = load_pretrained_model(output, device="cpu", dtype="float32")
    assert reloaded.load_report.unexpected_keys == [] and reloaded.load_report.missing_keys == []

    images = [parity_images_dir / name for name in ("boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png")]
    result = score_without_qscorer(output, images, tmp_path)
    assert result["class"] == "MPLUGOwl2LlamaForCausalLM"
    golden = [json.loads(line) for line in (golden_dir / "iqa_eval_lora_bs1.jsonl").read_text().splitlines()]
    assert result["scores"] == pytest.approx([record["score"] for record in golden], abs=1e-5)


def test_exported_tiny_model_scores_like_the_scorer_in_float16_folder(tmp_path):
    from PIL import Image

    source = save_tiny_checkpoint(tmp_path / "tiny", seed=31)
    image = tmp_path / "grey.png"
    Image.new("L", (40, 30), 90).save(image)
    expected = Scorer(source, device="cpu", dtype="float32")([image])

    from qscorer.export import export_model

    tokenizer, model, image_processor, _ = load_pretrained_model(source, device="cpu", dtype="float32")
    import torch

    export_model(model, tokenizer, image_processor, tmp_path / "exported", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["dtype"] == "bfloat16"
    result = score_without_qscorer(tmp_path / "exported", [image], tmp_path)
    assert result["scores"] == pytest.approx(expected, abs=0.1)


def test_merge_refuses_a_non_empty_output_folder(parity_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    status = main(
        [
            "merge",
            "--model-path",
            str(parity_dir / "qscorer_lora"),
            "--model-base",
            str(parity_dir / "base"),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2 and "is not empty" in capsys.readouterr().err
