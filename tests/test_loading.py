"""Checkpoint loading: kind detection from files, LoRA + non-LoRA weights, merge, errors, options."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny import save_tiny_checkpoint, tiny_model

from qscorer.checkpoints import checkpoint_kind, model_key, read_state_dict
from qscorer.errors import QScorerError
from qscorer.loading import (
    LoraAdapter,
    load_pretrained_model,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)
from qscorer.scoring import Scorer

IMAGES = ["boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png"]


def _scorer_golden(golden_dir, name="scorer_lora.json"):
    return json.loads((golden_dir / name).read_text())["batch1"]


def _assert_scores_match(scorer, images_dir, golden):
    for result, image in zip(scorer.score([images_dir / name for name in IMAGES]), IMAGES, strict=True):
        expected = golden[image]
        assert result.score == pytest.approx(expected["score"], abs=1e-5)
        assert result.token_id == expected["step0_argmax"]
        for token, logit in expected["step1_score_token_logits"].items():
            assert result.logits[token] == pytest.approx(logit, abs=1e-5)


def _copy_lora(parity_dir, target):
    shutil.copytree(parity_dir / "qscorer_lora", target)
    return target


def test_checkpoint_kind_comes_from_files_not_names(parity_dir, tmp_path):
    assert checkpoint_kind(_copy_lora(parity_dir, tmp_path / "my_finetune")) == "lora"
    assert checkpoint_kind(parity_dir / "qscorer_merged") == "full"
    assert checkpoint_kind(parity_dir / "base") == "full"
    (tmp_path / "empty").mkdir()
    with pytest.raises(QScorerError, match="neither a LoRA checkpoint"):
        checkpoint_kind(tmp_path / "empty")
    with pytest.raises(QScorerError, match="does not exist"):
        checkpoint_kind(tmp_path / "nowhere")
    (tmp_path / "my_finetune" / "non_lora_trainables.bin").unlink()
    with pytest.raises(QScorerError, match="non_lora_trainables"):
        checkpoint_kind(tmp_path / "my_finetune")


def test_lora_on_base_reproduces_the_original_scorer(parity_dir, golden_dir, parity_images_dir, tmp_path):
    lora = _copy_lora(parity_dir, tmp_path / "renamed_checkpoint")
    for batch_size in (1, 3):
        scorer = Scorer(
            lora,
            parity_dir / "base",
            device="cpu",
            dtype="float32",
            prompt="scorer",
            clamp=False,
            batch_size=batch_size,
        )
        _assert_scores_match(scorer, parity_images_dir, _scorer_golden(golden_dir))
    report = scorer.model.load_report
    assert report.kind == "lora" and report.unexpected_keys == []
    assert sorted(report.lora_modules) == sorted(
        json.loads((lora / "adapter_config.json").read_text())["target_modules"]
    )


def test_merged_checkpoint_reproduces_the_original_score_method(parity_dir, golden_dir, parity_images_dir):
    for batch_size in (1, 3):
        scorer = Scorer(
            parity_dir / "qscorer_merged", device="cpu", dtype="float32", prompt="scorer", batch_size=batch_size
        )
        _assert_scores_match(scorer, parity_images_dir, _scorer_golden(golden_dir, "score_merged_lora.json"))
    assert scorer.model.load_report.kind == "full" and scorer.model.load_report.unexpected_keys == []


def test_small_non_lora_file_and_safetensors_give_the_same_scores(parity_dir, golden_dir, parity_images_dir, tmp_path):
    lora = _copy_lora(parity_dir, tmp_path / "small")
    full_dump = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    kept = ("lm_head", "embed_tokens", "deepmlp", "vision_model", "visual_abstractor")
    small = {key: value for key, value in full_dump.items() if any(part in key for part in kept)}
    assert len(small) < len(full_dump)
    (lora / "non_lora_trainables.bin").unlink()
    save_file(small, lora / "non_lora_trainables.safetensors")
    adapter = torch.load(lora / "adapter_model.bin", weights_only=True)
    (lora / "adapter_model.bin").unlink()
    save_file(adapter, lora / "adapter_model.safetensors")
    scorer = Scorer(lora, parity_dir / "base", device="cpu", dtype="float32", prompt="scorer", clamp=False)
    _assert_scores_match(scorer, parity_images_dir, _scorer_golden(golden_dir))


def test_unexpected_non_lora_keys_are_refused_unless_allowed(parity_dir, tmp_path):
    lora = _copy_lora(parity_dir, tmp_path / "extra")
    weights = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    weights["base_model.model.model.some_new_head.weight"] = torch.zeros(3)
    torch.save(weights, lora / "non_lora_trainables.bin")
    with pytest.raises(QScorerError, match="some_new_head"):
        load_pretrained_model(lora, parity_dir / "base", device="cpu", dtype="float32")
    _, model, _, _ = load_pretrained_model(
        lora, parity_dir / "base", device="cpu", dtype="float32", allow_unexpected_keys=True
    )
    assert model.load_report.unexpected_keys == ["model.some_new_head.weight"]


def test_lora_without_base_and_base_without_head_are_explained(parity_dir, tmp_path):
    with pytest.raises(QScorerError, match="pass its base model"):
        load_pretrained_model(parity_dir / "qscorer_lora", device="cpu")
    with pytest.raises(QScorerError, match="no Q-Scorer head"):
        load_pretrained_model(parity_dir / "base", device="cpu")


def test_pickles_are_read_weights_only(tmp_path):
    torch.save({"weight": torch.ones(2), "note": argparse.Namespace(code="runs on load")}, tmp_path / "bad.bin")
    with pytest.raises(QScorerError, match="weights-only"):
        read_state_dict(tmp_path / "bad.bin")


def test_peft_prefixes_are_stripped():
    assert model_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert model_key("base_model.model.deepmlp.output_layer.bias") == "deepmlp.output_layer.bias"
    assert model_key("lm_head.weight") == "lm_head.weight"


def test_lora_delta_is_the_scaled_product_in_float32(tmp_path):
    model = tiny_model(seed=11)
    target = "model.layers.1.self_attn.v_proj.multiway.1"
    torch.manual_seed(0)
    lora_a, lora_b = torch.randn(4, 64), torch.randn(64, 4)
    torch.save(
        {f"base_model.model.{target}.lora_A.weight": lora_a, f"base_model.model.{target}.lora_B.weight": lora_b},
        tmp_path / "adapter_model.bin",
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [target], "fan_in_fan_out": False}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    adapter = LoraAdapter.read(tmp_path)
    adapter.check(model)
    assert list(adapter.pairs) == [target] and adapter.scaling == 2.0
    torch.testing.assert_close(adapter.delta(target, torch.device("cpu")), 2.0 * lora_b @ lora_a)
    assert adapter.delta("model.layers.0.self_attn.q_proj", torch.device("cpu")) is None
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QScorerError, match="plain LoRA"):
        LoraAdapter.read(tmp_path)


def test_device_dtype_and_attention_options(caplog):
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(QScorerError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(QScorerError, match="unknown device"):
        resolve_device("tpu:0")
    assert resolve_attn_implementation(None, torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"
    assert resolve_attn_implementation("flash_attention_2", torch.device("cpu")) == "sdpa"
    assert "flash_attention_2 needs flash-attn" in caplog.text


def test_tiny_checkpoint_loads_in_bfloat16_with_eager_attention(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        folder, device="cpu", dtype="bfloat16", attn_implementation="eager"
    )
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert context_len == 2048 and len(tokenizer) == model.config.vocab_size
    assert image_processor([__import__("PIL.Image").Image.new("RGB", (30, 20))]).shape == (1, 3, 448, 448)
    assert not model.training


def _copy_base(parity_dir, target):
    shutil.copytree(parity_dir / "base", target)
    return target


def _cli_error(capsys, argv):
    from qscorer.cli import main

    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_truncated_and_missing_shards_are_named(parity_dir, parity_images_dir, tmp_path, capsys):
    image = str(parity_images_dir / "boat.jpg")
    base = _copy_base(parity_dir, tmp_path / "base")
    weights = base / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = ["score", image, "--model-path", str(parity_dir / "qscorer_lora"), "--model-base", str(base)]
    assert f"cannot read {weights}" in _cli_error(capsys, [*argv, "--device", "cpu"])

    sharded = _copy_base(parity_dir, tmp_path / "sharded")
    state = torch.load(sharded / "pytorch_model.bin", weights_only=True)
    (sharded / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    torch.save({name: state[name] for name in halves["pytorch_model-00001-of-00002.bin"]},
               sharded / "pytorch_model-00001-of-00002.bin")
    weight_map = {name: shard for shard, keys in halves.items() for name in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    error = _cli_error(capsys, ["score", image, "--model-path", str(parity_dir / "qscorer_lora"), "--model-base",
                                str(sharded), "--device", "cpu"])
    assert "names shard pytorch_model-00002-of-00002.bin, which is missing" in error


def test_sharded_base_loads_like_the_single_file(parity_dir, golden_dir, parity_images_dir, tmp_path):
    sharded = _copy_base(parity_dir, tmp_path / "sharded")
    state = torch.load(sharded / "pytorch_model.bin", weights_only=True)
    (sharded / "pytorch_model.bin").unlink()
    weight_map = {}
    for index, names in enumerate((sorted(state)[::2], sorted(state)[1::2]), start=1):
        shard = f"pytorch_model-0000{index}-of-00002.bin"
        torch.save({name: state[name] for name in names}, sharded / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    scorer = Scorer(parity_dir / "qscorer_lora", sharded, device="cpu", dtype="float32", prompt="scorer", clamp=False)
    _assert_scores_match(scorer, parity_images_dir, _scorer_golden(golden_dir))


def test_adapter_that_does_not_fit_the_base_is_named(parity_dir, parity_images_dir, tmp_path, capsys):
    lora = _copy_lora(parity_dir, tmp_path / "lora")
    adapter = torch.load(lora / "adapter_model.bin", weights_only=True)
    key = next(key for key in adapter if key.endswith("lora_A.weight"))
    adapter[key] = torch.zeros(adapter[key].shape[0], 96)
    torch.save(adapter, lora / "adapter_model.bin")
    error = _cli_error(capsys, ["score", str(parity_images_dir / "boat.jpg"), "--model-path", str(lora),
                                "--model-base", str(parity_dir / "base"), "--device", "cpu"])
    assert str(lora / "adapter_model.bin") in error and "another base model" in error


def test_full_dump_non_lora_weights_are_read_instead_of_the_base(parity_dir, tmp_path):
    _, model, _, _ = load_pretrained_model(parity_dir / "qscorer_lora", parity_dir / "base", device="cpu",
                                           dtype="float32")
    report = model.load_report
    base = torch.load(parity_dir / "base" / "pytorch_model.bin", weights_only=True)
    tables = [value for key, value in base.items() if key.endswith("_pos_embed")]
    assert len(tables) == 4  # the abstractor's buffers: the full-dump non_lora file holds parameters only
    assert report.bytes_read[str(parity_dir / "base" / "pytorch_model.bin")] == sum(
        tensor.numel() * tensor.element_size() for tensor in tables)
    non_lora = torch.load(parity_dir / "qscorer_lora" / "non_lora_trainables.bin", weights_only=True)
    assert report.bytes_read[str(parity_dir / "qscorer_lora" / "non_lora_trainables.bin")] == sum(
        tensor.numel() * tensor.element_size() for tensor in non_lora.values())
    small = {key: value for key, value in non_lora.items() if "deepmlp" in key or "lm_head" in key}
    lora = _copy_lora(parity_dir, tmp_path / "small")
    torch.save(small, lora / "non_lora_trainables.bin")
    _, model, _, _ = load_pretrained_model(lora, parity_dir / "base", device="cpu", dtype="float32")
    base_bytes = model.load_report.bytes_read[str(parity_dir / "base" / "pytorch_model.bin")]
    lm_head = next(value for key, value in small.items() if "lm_head" in key)
    used = [value for key, value in base.items() if "lm_head" not in key and "rotary_emb" not in key]
    assert base_bytes == sum(tensor.numel() * tensor.element_size() for tensor in used)
    torch.testing.assert_close(model.lm_head.weight, lm_head.float(), rtol=0, atol=0)


def test_failed_merge_leaves_no_output(parity_dir, tmp_path, capsys, monkeypatch):
    from qscorer import export

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_remote_code", fail)
    out = tmp_path / "merged"
    argv = ["merge", "--model-path", str(parity_dir / "qscorer_lora"), "--model-base", str(parity_dir / "base"),
            "--output-dir", str(out), "--torch-dtype", "float32"]
    from qscorer.cli import main

    with pytest.raises(OSError, match="disk full"):
        main(argv)
    assert sorted(path.name for path in tmp_path.iterdir()) == []
