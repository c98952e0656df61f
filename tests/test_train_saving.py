"""Checkpoints: the original's file layout and key names, what its loader and peft read, identical
scores after loading, safetensors, full-model mode, starting from a checkpoint, resuming."""

import json
import shutil

import pytest
import torch
from test_train_support import base_config, demo_base_model, synthetic_data, training_argv

from qscorer.loading import load_pretrained_model
from qscorer.model import MPLUGOwl2LlamaForCausalLM
from qscorer.scoring import Scorer
from qscorer.train.arguments import parse_arguments
from qscorer.train.saving import load_lora_checkpoint
from qscorer.train.setup import build_model, load_training_tokenizer, write_base_model
from qscorer.train.train import train

PEFT_040_ADAPTER_FIELDS = {
    "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "init_lora_weights",
    "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "r",
    "revision", "target_modules", "task_type",
}
TARGETS = [f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj.multiway.1")]


def _train(output_dir, *extra, **options):
    return train(*parse_arguments(training_argv(output_dir, "--learning_rate", "1e-2", *extra, **options)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step LoRA run with train_lora.sh's trainable set; (run, output folder)."""
    output_dir = tmp_path_factory.mktemp("lora_run")
    return _train(output_dir, "--max_steps", "3", "--weight_next_token", "0.05"), output_dir


def _test_images(count=4):
    return sorted((synthetic_data() / "images").glob("test_*"))[:count]


def _assert_same_scores(model, tokenizer, folder, base, dtype="float32"):
    images = _test_images()
    in_memory = Scorer.from_model(model.eval(), tokenizer, clamp=False).score(images)
    loaded_tokenizer, loaded, _, _ = load_pretrained_model(folder, base, device="cpu", dtype=dtype)
    from_disk = Scorer.from_model(loaded, loaded_tokenizer, clamp=False).score(images)
    for memory, disk in zip(in_memory, from_disk, strict=True):
        assert disk.score == pytest.approx(memory.score, abs=1e-5)
        assert disk.token_id == memory.token_id
    assert len({result.score for result in in_memory}) > 1
    return loaded


def test_checkpoint_has_the_original_layout_and_key_names(trained):
    run, folder = trained
    adapter = torch.load(folder / "adapter_model.bin", weights_only=True)
    assert sorted(adapter) == sorted(
        f"base_model.model.{module}.lora_{part}.weight" for module in TARGETS for part in ("A", "B")
    )
    assert all(tensor.shape == ((8, 64) if ".lora_A." in key else (64, 8)) for key, tensor in adapter.items())

    config = json.loads((folder / "adapter_config.json").read_text())
    assert set(config) == PEFT_040_ADAPTER_FIELDS
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (8, 16, 0.05, "none")
    assert (config["task_type"], config["peft_type"], config["inference_mode"]) == ("CAUSAL_LM", "LORA", True)
    assert config["base_model_name_or_path"] == str(demo_base_model())

    non_lora = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    trainable = {name for name, parameter in run.model.named_parameters()
                 if parameter.requires_grad and "lora_" not in name}
    always = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    assert set(non_lora) == trainable | always
    assert not any(".base_layer" in key or ".default" in key for key in [*non_lora, *adapter])

    model_config = json.loads((folder / "config.json").read_text())
    assert model_config["use_cache"] is True and model_config["vocab_size"] == len(run.tokenizer)
    assert (model_config["weight_desp"], model_config["weight_next_token"]) == (1.0, 0.05)
    assert (model_config["tune_visual_abstractor"], model_config["freeze_vision_model"]) == (True, False)
    assert model_config["image_aspect_ratio"] == "pad" and model_config["visual_abstractor_lr"] is None
    assert (folder / "trainer_state.json").is_file() and (folder / "tokenizer.model").is_file()


def test_the_original_loaders_key_rules_accept_it(trained):
    """The original builder strips "base_model." then "model." from non-LoRA keys and loads with strict=False;
    peft 0.4.0 inserts the adapter name before the "weight" after "lora_". Both must land on real keys."""
    run, folder = trained
    fresh = MPLUGOwl2LlamaForCausalLM(base_config(len(run.tokenizer)))
    own_keys = set(fresh.state_dict())
    non_lora = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    stripped = [key[len("base_model."):] for key in non_lora]
    assert any(key.startswith("model.model.") for key in stripped)
    stripped = [key[len("model."):] if key.startswith("model.") else key for key in stripped]
    assert set(stripped) <= own_keys
    peft_keys = set(run.model.state_dict())
    for key in torch.load(folder / "adapter_model.bin", weights_only=True):
        suffix = key.split("lora_")[1]
        renamed = key.replace(suffix.split(".", 1)[1], f"default.{suffix.split('.', 1)[1]}")
        assert renamed in peft_keys


def test_saved_checkpoint_scores_like_the_model_in_memory(trained):
    run, folder = trained
    loaded = _assert_same_scores(run.model.get_base_model(), run.tokenizer, folder, demo_base_model())
    assert loaded.load_report.kind == "lora" and sorted(loaded.load_report.lora_modules) == sorted(TARGETS)
    assert loaded.load_report.unexpected_keys == []


def test_current_peft_reads_the_adapter(trained):
    from peft import PeftConfig, PeftModel

    run, folder = trained
    base = MPLUGOwl2LlamaForCausalLM.from_pretrained(demo_base_model())
    base.add_score_tokens(list(range(512, 517)), [f"<score{level}>" for level in range(1, 6)])
    config = PeftConfig.from_pretrained(folder)
    assert config.task_type == "CAUSAL_LM"
    config.task_type = None  # peft's causal-LM wrapper needs generation hooks the model does not define
    peft_model = PeftModel.from_pretrained(base, folder, config=config)
    trained_state = run.model.state_dict()
    lora_keys = [key for key in peft_model.state_dict() if "lora_" in key]
    assert len(lora_keys) == 8
    for key in lora_keys:
        torch.testing.assert_close(peft_model.state_dict()[key], trained_state[key])


def test_save_safetensors_writes_safetensors_files(tmp_path):
    run = _train(tmp_path, "--max_steps", "1", "--save_safetensors", "True")
    names = {path.name for path in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "non_lora_trainables.safetensors"} <= names
    assert not {"adapter_model.bin", "non_lora_trainables.bin"} & names
    _assert_same_scores(run.model.get_base_model(), run.tokenizer, tmp_path, demo_base_model())


def test_full_model_mode_saves_a_loadable_model(tmp_path):
    run = _train(tmp_path, "--max_steps", "1", "--lora_enable", "False")
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = _assert_same_scores(run.model, run.tokenizer, tmp_path, None)
    assert loaded.load_report.kind == "full" and loaded.config.use_cache is True


def test_lora_weight_path_starts_from_a_checkpoint(trained, tmp_path):
    run, folder = trained
    model_args, data_args, training_args = parse_arguments(training_argv(tmp_path, "--lora_weight_path", folder))
    model = build_model(model_args, data_args, training_args, load_training_tokenizer(model_args, training_args))
    start, saved = model.state_dict(), run.model.state_dict()
    for key, value in saved.items():
        if "lora_" in key or "deepmlp" in key or "visual_abstractor" in key or "lm_head" in key:
            torch.testing.assert_close(start[key], value)


def test_loading_refuses_a_different_lora_layout(trained, tmp_path):
    from qscorer.errors import QScorerError

    _, folder = trained
    model_args, data_args, training_args = parse_arguments(training_argv(tmp_path, "--lora_r", "4"))
    model = build_model(model_args, data_args, training_args, load_training_tokenizer(model_args, training_args))
    with pytest.raises(QScorerError, match="LoRA layout"):
        load_lora_checkpoint(model, folder)


def test_resumed_run_continues_like_an_uninterrupted_one(tmp_path):
    flags = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3")
    whole = _train(tmp_path / "whole", *flags)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert {"adapter_model.bin", "non_lora_trainables.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        path.name for path in checkpoint.iterdir()
    }
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed = _train(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "last")
    assert resumed.losses == whole.losses and len(whole.losses) == 6
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)


def test_real_llama_tokenizer_run_round_trips(llama_tokenizer_dir, tmp_path):
    base = write_base_model(tmp_path / "base", base_config(32000), llama_tokenizer_dir, seed=1)
    run = _train(tmp_path / "out", "--max_steps", "1", base=base)
    assert run.tokenizer.convert_tokens_to_ids("<score1>") == 32000
    _assert_same_scores(run.model.get_base_model(), run.tokenizer, tmp_path / "out", base)
