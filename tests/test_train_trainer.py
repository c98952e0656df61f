"""The Trainer's parts: modality-length grouped sampler, optimizer parameter groups, the batch
objective (dispatcher, soft-label KL, in-level, pair ranking) and its gradients."""

import json

import pytest
import torch
from test_train_support import synthetic_data, training_argv

from qscorer.data.conversation import level_word_ids
from qscorer.data.losses import continuous_rating_loss, in_level_loss, score_and_std, soft_label_kl_loss
from qscorer.errors import QScorerError
from qscorer.model.modeling import TASK_INPUTS as MODEL_INPUTS
from qscorer.train.arguments import parse_arguments
from qscorer.train.data import build_training_data
from qscorer.train.objectives import BatchObjective
from qscorer.train.sampler import (
    ModalityLengthGroupedSampler,
    modality_length_grouped_indices,
    split_to_even_chunks,
)
from qscorer.train.setup import build_model, load_training_tokenizer
from qscorer.train.trainer import QScorerTrainer, decay_parameter_names, parameter_groups


def _setup(tmp_path, *extra, meta="train.json"):
    model_args, data_args, training_args = parse_arguments(training_argv(tmp_path, *extra, meta=meta))
    tokenizer = load_training_tokenizer(model_args, training_args)
    torch.manual_seed(0)
    model = build_model(model_args, data_args, training_args, tokenizer)
    dataset, collator = build_training_data(tokenizer, data_args, training_args, model_args.version)
    return model, dataset, collator, training_args


def _batch(dataset, collator, rows=(0, 1, 2)):
    return collator([dataset[row] for row in rows])


# ---------------------------------------------------------------- sampler


def test_even_chunks_go_to_the_lightest_chunk_until_full():
    lengths = [10, 9, 8, 7, 6, 5]
    assert split_to_even_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 4], [1, 2, 5]]
    assert split_to_even_chunks([0, 1, 2, 3, 4], lengths, 2) == [[0, 2, 4], [1, 3]]


def test_same_sign_lengths_form_sorted_megabatches():
    lengths = [3, 9, 1, 7, 5, 8, 2, 6]
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=2,
                                            generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(8))
    permutation = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    for start in (0, 4):
        megabatch = sorted(permutation[start : start + 4], key=lambda index: lengths[index], reverse=True)
        assert order[start : start + 4] == [megabatch[i] for i in (0, 3, 1, 2)]


def test_mixed_modalities_stay_apart_and_leftovers_come_last():
    lengths = [5, -3, 4, -2, 6, -7, 2, 8, 1, -1]  # 6 records with an image, 4 text-only
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=1,
                                            generator=torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(10))
    # Megabatches of 2: images 3, text 2. The last of each is merged into the leftover, sorted by index, at the end.
    for start in (0, 2, 4):
        batch = order[start : start + 2]
        assert len({lengths[index] > 0 for index in batch}) == 1
        assert lengths[batch[0]] * (1 if lengths[batch[0]] > 0 else -1) >= abs(lengths[batch[1]])
    leftover = order[6:]
    assert leftover == sorted(leftover) and sum(lengths[index] > 0 for index in leftover) == 2


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = list(range(1, 41))
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(40)) and len(sampler) == 40
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=4)) != first


def test_trainer_uses_the_grouped_sampler_with_world_times_accumulation(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--gradient_accumulation_steps", "3")
    trainer = QScorerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler)
    assert (sampler.batch_size, sampler.world_size, sampler.seed) == (4, 3, 0)
    assert sampler.lengths == dataset.modality_lengths


def test_non_finite_log_values_are_logged_as_null(tmp_path, caplog):
    model, dataset, collator, args = _setup(tmp_path)
    trainer = QScorerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.log({"loss": 1.5, "grad_norm": float("nan"), "learning_rate": float("inf")})
    assert trainer.state.log_history[-1]["grad_norm"] is None and trainer.state.log_history[-1]["loss"] == 1.5
    assert trainer.state.log_history[-1]["learning_rate"] is None
    trainer.state.save_to_json(tmp_path / "trainer_state.json")
    json.loads((tmp_path / "trainer_state.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert "grad_norm = nan, learning_rate = inf not finite, logged as null" in caplog.text


def _refuse(constant):
    raise AssertionError(f"{constant} is not JSON")


# ---------------------------------------------------------------- optimizer


def test_parameter_groups_split_decay_and_give_the_abstractor_its_lr(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--visual_abstractor_lr", "3e-4", "--weight_decay", "0.1")
    decay = decay_parameter_names(model)
    names = {name for name, _ in model.named_parameters()}
    assert not any("bias" in name or "norm" in name.split(".")[-2] for name in decay)
    assert "base_model.model.model.vision_model.embeddings.pre_layernorm.weight" not in decay
    assert "base_model.model.model.layers.0.input_layernorm.multiway.0.weight" not in decay
    assert "base_model.model.deepmlp.output_layer.weight" in decay and decay < names

    trainer = QScorerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    optimizer = trainer.create_optimizer()
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        group_names = {by_id[id(parameter)] for parameter in group["params"]}
        seen += group_names
        abstractor = {"visual_abstractor" in name for name in group_names}
        decayed = {name in decay for name in group_names}
        assert len(abstractor) == 1 and len(decayed) == 1
        assert group["weight_decay"] == (0.1 if decayed == {True} else 0.0)
        assert group["lr"] == (3e-4 if abstractor == {True} else args.learning_rate)
    assert len(optimizer.param_groups) == 4
    assert sorted(seen) == sorted(name for name, p in model.named_parameters() if p.requires_grad)


def test_without_abstractor_lr_there_are_two_groups(tmp_path):
    model, *_ = _setup(tmp_path)
    groups = parameter_groups(model, 0.0, None)
    assert len(groups) == 2 and all("lr" not in group for group in groups)


# ---------------------------------------------------------------- objective


def test_single_batches_go_through_the_models_dispatcher(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--weight_next_token", "0.05")
    model.eval()
    batch = _batch(dataset, collator)
    objective = BatchObjective(model.get_base_model().config)
    with torch.no_grad():
        result = objective(model, batch)
        expected = model(**{key: batch[key] for key in MODEL_INPUTS}).loss
    assert result.loss.item() == pytest.approx(0.05 * expected.item(), rel=1e-6)
    assert result.parts["loss_score"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_label_and_in_level_terms_are_read_at_the_score_positions(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--weight_soft_kl", "0.5", "--weight_in_level", "0.25")
    model.eval()
    batch = _batch(dataset, collator)
    ids = model.get_base_model().config.score_token_id
    with torch.no_grad():
        result = BatchObjective(model.get_base_model().config)(model, batch)
        output = model(**{key: batch[key] for key in MODEL_INPUTS})
    positions = output.score_positions
    assert positions[:, 0].tolist() == [0, 1, 2]
    logits = output.logits[positions[:, 0], positions[:, 1]]
    kl = soft_label_kl_loss(logits, batch["level_probs"], ids, closed_set=False)
    in_level = in_level_loss(logits, ids)
    assert result.parts["loss_soft_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert result.parts["loss_in_level"].item() == pytest.approx(in_level.item(), rel=1e-5)
    assert result.loss.item() == pytest.approx(output.loss.item() + 0.5 * kl.item() + 0.25 * in_level.item(), rel=1e-5)
    records = dataset.records[:3]
    expected = torch.tensor([record.fields["level_probs"] for record in records], dtype=torch.float32)
    torch.testing.assert_close(batch["level_probs"], expected)


def _level_word_positions(batch, level_ids) -> list[list[int]]:
    """(row, spliced position) predicting the level word, by hand: its label index - 1, shifted by the 64 extra
    rows of the one image that precedes it (65 visual rows replace one placeholder)."""
    rows = []
    for row, labels in enumerate(batch["labels"].tolist()):
        index = next(i for i, label in enumerate(labels) if label in level_ids)
        rows.append([row, index - 1 + 64])
    return rows


def test_level_word_answers_get_the_soft_label_terms_at_the_level_word(tmp_path):
    model, dataset, collator, args = _setup(
        tmp_path, "--rating_tokens", "level_words", "--weight_soft_kl", "0.5", "--weight_in_level", "0.25",
        meta="train_levels.json",
    )
    model.eval()
    batch = _batch(dataset, collator)
    excellent_first = list(reversed(level_word_ids(dataset.tokenizer)))
    trainer = QScorerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                             tokenizer=dataset.tokenizer)
    assert trainer.objective.rating_token_ids == excellent_first
    with torch.no_grad():
        result = trainer.objective(model, batch)
        output = model(**{key: batch[key] for key in MODEL_INPUTS})
    positions = _level_word_positions(batch, excellent_first)
    assert trainer.objective.rating_positions(output).tolist() == positions
    logits = output.logits[[row for row, _ in positions], [position for _, position in positions]]
    kl = soft_label_kl_loss(logits, batch["level_probs"], excellent_first, closed_set=False)
    in_level = in_level_loss(logits, excellent_first)
    assert result.parts["loss_soft_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert result.loss.item() == pytest.approx(output.loss.item() + 0.5 * kl.item() + 0.25 * in_level.item(), rel=1e-5)
    assert output.loss_score.item() == 0.0  # no score token: the regression head is not trained


def test_level_word_pairs_are_ranked_by_the_expected_level(tmp_path):
    model, dataset, collator, args = _setup(
        tmp_path, "--rating_tokens", "level_words", "--dataset_type", "pair", "--pair_std_field", "std",
        "--closeset_rating_loss", "True", meta="train_levels.json",
    )
    model.eval()
    batch = _batch(dataset, collator)
    level_ids = level_word_ids(dataset.tokenizer)
    excellent_first = list(reversed(level_ids))
    with torch.no_grad():
        result = BatchObjective(model.get_base_model().config, level_ids)(model, batch)
        scores = {}
        for half in ("A", "B"):
            item = batch[f"item_{half}"]
            output = model(**{key: item[key] for key in MODEL_INPUTS})
            rows, positions = zip(*_level_word_positions(item, excellent_first))
            scores[half] = score_and_std(output.logits[list(rows), list(positions)][:, excellent_first])[0]
    rank = continuous_rating_loss(scores["A"], scores["B"], batch["gt_scores_norm_A"], batch["gt_scores_norm_B"],
                                  batch["stds_A"], batch["stds_B"])
    assert result.parts["loss_rank"].item() == pytest.approx(rank.item(), rel=1e-5)


def test_soft_label_terms_refuse_answers_without_the_rating_tokens(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--weight_soft_kl", "0.5", meta="train_levels.json")
    batch = _batch(dataset, collator)
    with pytest.raises(QScorerError, match=r"none of the rating tokens \(score_tokens\)"):
        BatchObjective(model.get_base_model().config)(model, batch)


def test_the_head_cannot_rank_level_word_answers(tmp_path):
    with pytest.raises(QScorerError, match="--rating_tokens score_tokens"):
        parse_arguments(training_argv(tmp_path, "--rating_tokens", "level_words", "--rank_score_source", "head"))


def test_pair_batches_add_the_ranking_loss_between_the_halves(tmp_path):
    model, dataset, collator, args = _setup(
        tmp_path, "--dataset_type", "pair", "--pair_std_field", "std", "--closeset_rating_loss", "True",
        "--use_fix_std", "False", "--weight_rank", "2.0",
    )
    model.eval()
    batch = _batch(dataset, collator)
    assert batch["input_type"] == "pair"
    ids = model.get_base_model().config.score_token_id
    with torch.no_grad():
        result = BatchObjective(model.get_base_model().config)(model, batch)
        halves = {}
        for half in ("A", "B"):
            output = model(**{key: batch[f"item_{half}"][key] for key in MODEL_INPUTS})
            positions = output.score_positions
            halves[half] = (output.loss, score_and_std(output.logits[positions[:, 0], positions[:, 1]][:, ids]))
    (loss_a, (score_a, std_a)), (loss_b, (score_b, std_b)) = halves["A"], halves["B"]
    rank = continuous_rating_loss(score_a, score_b, batch["gt_scores_norm_A"], batch["gt_scores_norm_B"],
                                  batch["stds_A"], batch["stds_B"], std_a, std_b)
    assert result.parts["loss_rank"].item() == pytest.approx(rank.item(), rel=1e-5)
    assert result.loss.item() == pytest.approx((loss_a + loss_b + 2.0 * rank).item(), rel=1e-5)


def test_pair_items_must_be_score_records(tmp_path):
    model, dataset, collator, args = _setup(tmp_path, "--dataset_type", "pair", "--pair_std_field", "std")
    batch = _batch(dataset, collator, rows=(0, 1))
    batch["item_A"]["task_types"] = ["score", "description"]
    with pytest.raises(QScorerError, match="score records only"):
        BatchObjective(model.get_base_model().config)(model, batch)


def test_soft_labels_are_validated(tmp_path):
    import json

    data = synthetic_data()
    records = json.loads((data / "metas" / "train.json").read_text())
    records[1]["level_probs"] = [0.5, 0.5, 0.5, 0.0, 0.0]
    meta = tmp_path / "bad.json"
    meta.write_text(json.dumps(records))
    model_args, data_args, training_args = parse_arguments(training_argv(tmp_path, "--weight_soft_kl", "1"))
    data_args.data_paths = [str(meta)]
    tokenizer = load_training_tokenizer(model_args, training_args)
    with pytest.raises(QScorerError, match="record 1: --weight_soft_kl needs 'level_probs'"):
        build_training_data(tokenizer, data_args, training_args, "v1")


def test_score_position_hidden_states_receive_gradients(tmp_path):
    model, dataset, collator, args = _setup(tmp_path)
    # Inside (0, 5), so the training clamp passes the squared error's gradient (it is 0 below 0, like the original).
    torch.nn.init.constant_(model.get_base_model().deepmlp.output_layer.bias, 2.5)
    trainer = QScorerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    batch = _batch(dataset, collator)
    with torch.no_grad():
        positions = model(**{key: batch[key] for key in MODEL_INPUTS}).score_positions
    captured = []

    def keep(module, inputs, output):
        output[0].retain_grad()
        captured.append(output[0])

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hook = model.get_base_model().model.register_forward_hook(keep)
    try:
        trainer.compute_loss(model, batch).backward()
    finally:
        hook.remove()
    at_scores = captured[-1].grad[positions[:, 0], positions[:, 1]]
    assert at_scores.abs().sum(dim=-1).min() > 0
    head = model.get_base_model().deepmlp
    assert head.output_layer.weight.grad.abs().sum() > 0 and head.model[0].linear.weight.grad.abs().sum() > 0
