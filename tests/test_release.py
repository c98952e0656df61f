"""The published release's formats, at tiny size, written by benchmarks/make_synthetic_release.py: a sharded fp16
base with rotary extras plus a full-dump bf16 LoRA checkpoint load with zero unexpected keys, read every tensor once,
and merge into a folder that scores the same."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qscorer.cli import main
from qscorer.scoring import Scorer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_synthetic_release.py"


@pytest.fixture(scope="module")
def release(tmp_path_factory, llama_tokenizer_dir):
    out = tmp_path_factory.mktemp("release") / "tiny"
    command = [sys.executable, str(SCRIPT), str(out), "--size", "tiny", "--tokenizer", str(llama_tokenizer_dir)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return out


def test_release_files_have_the_published_layout(release):
    assert sorted(path.name for path in (release / "lora").iterdir()) == [
        "adapter_config.json", "adapter_model.bin", "config.json", "non_lora_trainables.bin"]
    non_lora = torch.load(release / "lora" / "non_lora_trainables.bin", weights_only=True)
    assert all(key.startswith("base_model.model.") for key in non_lora)
    assert {tensor.dtype for tensor in non_lora.values()} == {torch.bfloat16}
    assert non_lora["base_model.model.lm_head.weight"].shape[0] == 32005
    base = torch.load(release / "base" / "pytorch_model-00001-of-00001.bin", weights_only=True)
    assert base["lm_head.weight"].shape[0] == 32000 and base["lm_head.weight"].dtype == torch.float16
    assert sum(key.endswith("rotary_emb.inv_freq") for key in base) == 2


def test_release_loads_once_and_merges_to_the_same_scores(release, parity_images_dir, tmp_path):
    images = [parity_images_dir / "boat.jpg", parity_images_dir / "portrait_300x500.png"]
    lora = Scorer(release / "lora", release / "base", device="cpu", dtype="float32", clamp=False)
    report = lora.model.load_report
    assert report.unexpected_keys == [] and len(report.lora_modules) == 4
    assert report.bytes_read[str(release / "base" / "pytorch_model-00001-of-00001.bin")] == 0
    assert main(["merge", "--model-path", str(release / "lora"), "--model-base", str(release / "base"),
                 "--output-dir", str(tmp_path / "merged"), "--torch-dtype", "float32"]) == 0
    merged = Scorer(tmp_path / "merged", device="cpu", dtype="float32", clamp=False)
    assert merged.model.load_report.unexpected_keys == []
    for ours, theirs in zip(lora.score(images), merged.score(images), strict=True):
        assert ours.score == pytest.approx(theirs.score, abs=1e-5)
        assert ours.token_id == theirs.token_id
