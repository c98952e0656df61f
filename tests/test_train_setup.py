"""Model set-up for training: score tokens, LoRA targets, trainable set, config fields, dtypes,
gradient checkpointing, and the original's training loss on its own LoRA checkpoint."""

import json
import os
from unittest import mock

import pytest
import torch
from test_train_support import SCRIPTS, demo_base_model, training_argv

from qscorer.data import score_token_ids
from qscorer.data.datasets import SingleCollator, SingleDataset
from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM
from qscorer.train.arguments import parse_arguments
from qscorer.train.objectives import BatchObjective
from qscorer.train.saving import load_lora_checkpoint
from qscorer.train.setup import build_model, load_training_tokenizer, lora_target_modules


def _build(tmp_path, *extra, base=None):
    model_args, data_args, training_args = parse_arguments(training_argv(tmp_path, *extra, base=base))
    tokenizer = load_training_tokenizer(model_args, training_args)
    torch.manual_seed(0)
    return build_model(model_args, data_args, training_args, tokenizer), tokenizer


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_lora_targets_of_the_7b_model_are_the_originals_64():
    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(MPLUGOwl2Config())
    expected = {f"model.layers.{i}.self_attn.{name}" for i in range(32) for name in ("q_proj", "v_proj.multiway.1")}
    targets = lora_target_modules(model)
    assert len(targets) == 64 and set(targets) == expected


def test_lora_wraps_exactly_the_targets_of_the_tiny_model(tmp_path):
    model, _ = _build(tmp_path)
    wrapped = sorted({name.split(".lora_A")[0] for name in _trainable(model) if ".lora_A." in name})
    names = ("q_proj", "v_proj.multiway.1")
    assert wrapped == [f"base_model.model.model.layers.{i}.self_attn.{name}" for i in range(2) for name in names]
    assert not any("vision_model" in name or "visual_abstractor" in name for name in wrapped)


def test_score_tokens_grow_the_embeddings_with_mean_output_rows(tmp_path):
    base = MPLUGOwl2LlamaForCausalLM.from_pretrained(demo_base_model())
    model, tokenizer = _build(tmp_path)
    ids = score_token_ids(tokenizer)
    vocab = base.config.vocab_size
    assert ids == list(range(vocab, vocab + 5)) and len(tokenizer) == vocab + 5
    inner = model.get_base_model()
    assert inner.config.vocab_size == vocab + 5 and inner.config.score_token_id == ids[::-1]
    mean = base.lm_head.weight.mean(dim=0)
    for row in ids:
        torch.testing.assert_close(inner.lm_head.weight[row], mean)
    torch.testing.assert_close(inner.lm_head.weight[:vocab], base.lm_head.weight)


def test_trainable_set_follows_the_flags(tmp_path):
    model, _ = _build(tmp_path)
    trainable = _trainable(model)
    groups = {
        "lora": {name for name in trainable if "lora_" in name},
        "lm_head": {name for name in trainable if "lm_head" in name},
        "deepmlp": {name for name in trainable if "deepmlp" in name},
        "vision": {name for name in trainable if "vision_model" in name},
        "abstractor": {name for name in trainable if "visual_abstractor" in name},
    }
    assert set().union(*groups.values()) == trainable
    everything = dict(model.named_parameters())
    for part in ("vision_model", "visual_abstractor"):
        assert {name for name in everything if f".{part}." in name} <= trainable
    assert len(groups["lora"]) == 8 and groups["lm_head"] and groups["deepmlp"]
    assert not any("embed_tokens" in name or "mlp.gate_proj" in name for name in trainable)

    frozen_visual, _ = _build(tmp_path, "--tune_visual_abstractor", "False", "--freeze_vision_model", "True")
    assert all("lora_" in name or "lm_head" in name or "deepmlp" in name for name in _trainable(frozen_visual))

    full, _ = _build(tmp_path, "--lora_enable", "False")
    assert not any("lora_" in name for name, _ in full.named_parameters())
    assert _trainable(full) == {name for name, _ in full.named_parameters()}


def test_training_fields_are_written_into_the_config(tmp_path):
    model, _ = _build(tmp_path, "--weight_next_token", "0.05", "--visual_abstractor_lr", "1e-4")
    config = model.get_base_model().config
    assert config.use_cache is False
    assert (config.weight_desp, config.weight_next_token) == (1.0, 0.05)
    assert (config.image_aspect_ratio, config.image_grid_pinpoints) == ("pad", None)
    assert config.tune_visual_abstractor is True and config.freeze_vision_model is False
    assert config.visual_abstractor_lr == 1e-4
    assert config.continuous_rating_loss is None  # pair-loss settings are recorded for pair training only

    pair, _ = _build(tmp_path, "--dataset_type", "pair", "--closeset_rating_loss", "True", "--weight_in_level", "0.5")
    pair_config = pair.get_base_model().config
    assert (pair_config.closeset_rating_loss, pair_config.weight_in_level, pair_config.binary_rating_loss) == (
        True, 0.5, "fidelity"
    )


def test_bf16_keeps_trainable_weights_in_float32_without_deepspeed(tmp_path):
    model, _ = _build(tmp_path, "--bf16", "True", "--use_cpu", "True")
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert all(dtypes[name] == torch.float32 for name in _trainable(model))
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16

    with mock.patch.dict(os.environ):  # transformers 4.57 records DeepSpeed use in the environment
        with_deepspeed, _ = _build(tmp_path, "--bf16", "True", "--use_cpu", "True", "--deepspeed",
                                   SCRIPTS / "zero2.json")
    assert with_deepspeed.get_base_model().deepmlp.output_layer.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_makes_embedding_outputs_require_grad(tmp_path):
    model, tokenizer = _build(tmp_path)
    embeddings = model.get_base_model().get_input_embeddings()
    assert embeddings(torch.tensor([[1, 2]])).requires_grad
    plain, _ = _build(tmp_path, "--gradient_checkpointing", "False")
    assert not plain.get_base_model().get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_original_lora_checkpoint_gives_the_original_training_loss(parity_dir, golden_dir, parity_images_dir,
                                                                   tmp_path):
    """The parity base + the original's LoRA checkpoint, set up by our training code: the dispatcher loss of the
    golden batch matches the original's (LoRA unmerged, eval mode)."""
    golden = json.loads((golden_dir / "training.json").read_text())["lora_unmerged"]
    model, tokenizer = _build(tmp_path, "--weight_next_token", "0.05", base=parity_dir / "base")
    load_lora_checkpoint(model, parity_dir / "qscorer_lora")
    model.eval()
    dataset = SingleDataset([golden_dir / "train_meta.json"], tokenizer, image_folder=parity_images_dir,
                            image_aspect_ratio="pad", template="v1")
    batch = SingleCollator.from_tokenizer(tokenizer, 2048)([dataset[index] for index in range(3)])
    objective = BatchObjective(model.get_base_model().config)
    with torch.no_grad():
        output = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels", "images", "gt_scores")})
        assert output.loss_ce.item() == pytest.approx(golden["loss_ce"], rel=1e-5)
        assert output.loss.item() == pytest.approx(golden["loss_total"], rel=1e-5)
        all_score = objective(model, batch).loss
        mixed = objective(model, {**batch, "task_types": ["score", "description", "score"]}).loss
    assert all_score.item() == pytest.approx(golden["dispatcher_single"]["all_score"]["loss"], rel=1e-5)
    assert mixed.item() == pytest.approx(golden["dispatcher_single"]["score_description_score"]["loss"], rel=1e-5)
