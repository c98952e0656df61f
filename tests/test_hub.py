"""Hub ids as model locations, offline: a cache laid out like the Hub's in a temporary HF_HOME, never the network."""

import json
import shutil

import pytest

from qscorer.checkpoints import files_to_fetch
from qscorer.cli import main
from qscorer.errors import QScorerError
from qscorer.hub import PUBLISHED_BASE, PUBLISHED_MODEL, is_repo_id, locate

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGES = ["boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png"]


def cache_repo(hf_home, repo_id, source, *, revision="main", commit=COMMIT, only=None):
    """Put ``source``'s files (or the names in ``only``) into the Hub cache layout under ``hf_home``."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if only is None or path.name in only:
            shutil.copyfile(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def published_pair(hf_home, parity_dir):
    """The tiny parity LoRA and base, cached under the published ids."""
    cache_repo(hf_home, PUBLISHED_MODEL, parity_dir / "qscorer_lora")
    cache_repo(hf_home, PUBLISHED_BASE, parity_dir / "base")
    return hf_home


def _score_lines(capsys):
    return [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def test_score_without_model_options_uses_the_published_pair(published_pair, parity_images_dir, golden_dir, capsys):
    images = [str(parity_images_dir / name) for name in IMAGES]
    assert main(["score", *images, "--device", "cpu", "--dtype", "float32", "--prompt", "scorer", "--no-clamp"]) == 0
    golden = json.loads((golden_dir / "scorer_lora.json").read_text())["batch1"]
    lines = _score_lines(capsys)
    assert [path for path, _ in lines] == images
    for (_, score), name in zip(lines, IMAGES, strict=True):
        assert float(score) == pytest.approx(golden[name]["score"], abs=1e-5)


def test_explicit_hub_ids_and_revisions(published_pair, parity_dir, parity_images_dir, golden_dir, capsys):
    other = "fedcba9876543210fedcba9876543210fedcba98"
    cache_repo(published_pair, "someone/qscorer-merged", parity_dir / "qscorer_merged", revision="v1", commit=other)
    image = str(parity_images_dir / "boat.jpg")
    argv = ["score", image, "--model-path", "someone/qscorer-merged", "--revision", "v1", "--device", "cpu",
            "--dtype", "float32", "--prompt", "scorer"]
    assert main(argv) == 0
    golden = json.loads((golden_dir / "score_merged_lora.json").read_text())["batch1"]["boat.jpg"]
    assert float(_score_lines(capsys)[0][1]) == pytest.approx(golden["score"], abs=1e-5)
    assert main(["score", image, "--model-path", "someone/qscorer-merged", "--revision", "v2", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "someone/qscorer-merged (revision v2) is not in the Hugging Face cache" in error


def test_missing_and_partly_cached_ids_are_one_line_errors(hf_home, parity_dir, parity_images_dir, capsys):
    image = str(parity_images_dir / "boat.jpg")
    assert main(["score", image, "--model-path", "nobody/nothing", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qscorer score: error: nobody/nothing is not in the Hugging Face cache")
    assert error.count("\n") == 1 and "offline" in error
    cache_repo(hf_home, "someone/partial", parity_dir / "qscorer_merged", only={"config.json"})
    assert main(["score", image, "--model-path", "someone/partial", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "someone/partial is only partly cached" in error and "model.safetensors" in error


def test_locations_are_folders_first_then_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert locate("org/model").resolve() == tmp_path / "org" / "model"
    assert is_repo_id("2kxx/Qscorer_lora_5_1") and not is_repo_id("org/model")
    assert not is_repo_id("a/b/c") and not is_repo_id("../x") and not is_repo_id("checkpoints")
    with pytest.raises(QScorerError, match="does not exist"):
        locate("checkpoints/none/here")
    with pytest.raises(QScorerError, match="applies to Hub ids"):
        locate("org/model", revision="v1")


def test_only_the_needed_files_are_fetched():
    lora = ["README.md", "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "config.json",
            "non_lora_trainables.bin", "trainer_state.json", ".gitattributes"]
    assert sorted(files_to_fetch(lora)) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "non_lora_trainables.bin"]
    base = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "preprocessor_config.json", "generation_config.json", "README.md"]
    assert sorted(files_to_fetch(base)) == sorted(set(base) - {"generation_config.json", "README.md"})
    merged = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "pytorch_model.bin", "added_tokens.json", "tokenizer.model"]
    assert sorted(files_to_fetch(merged)) == sorted(set(merged) - {"pytorch_model.bin"})


def test_online_fetch_downloads_only_what_loading_needs(tmp_path, monkeypatch, parity_dir):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    calls = {}

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            calls["listed"] = (repo_id, revision)
            return ["config.json", "model.safetensors", "pytorch_model.bin", "README.md", "tokenizer.model"]

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **_):
        calls["download"] = (repo_id, revision, str(cache_dir), sorted(allow_patterns))
        return str(parity_dir / "qscorer_merged")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert locate("someone/model", revision="v3") == parity_dir / "qscorer_merged"
    assert calls["listed"] == ("someone/model", "v3")
    assert calls["download"] == (
        "someone/model", "v3", str(tmp_path / "hub"), ["config.json", "model.safetensors", "tokenizer.model"])
