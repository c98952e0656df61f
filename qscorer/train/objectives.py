"""The training objective of a batch, computed from the model's outputs (the Trainer's ``compute_loss``).

- Single batches (``input_type="single"``) go through the model's task-type dispatcher: ``weight_desp`` x the loss
  of description records + ``weight_next_token`` x the loss of score records, each loss being CE + the score head's
  squared error (facts §3.4, §3.5). When a term needs the score-token logits (``--weight_soft_kl``,
  ``--weight_in_level``), the two subsets are run here instead, so their outputs can be read.
- Pair batches (``input_type="pair"``, qscorer's working version of the original's dead pair path, facts §10.3):
  the loss of each half as above, plus ``weight_rank`` x a ranking loss between the halves, whose scores are the
  expected value of the score-token distribution at the score position (or the head's output).

Extra terms per score record, read at the position that predicts the score token: ``weight_soft_kl`` x the KL from
the soft label to the score-token distribution, and ``weight_in_level`` x DeQA's in-level loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.losses import (
    SCORE_WEIGHTS,
    binary_rating_loss,
    continuous_rating_loss,
    in_level_loss,
    score_and_std,
    soft_label_kl_loss,
)
from ..errors import QScorerError

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "images", "gt_scores")
"""Batch keys the model's ``forward_mlp`` takes."""
TASKS = ("description", "score")


@dataclass(frozen=True)
class Objective:
    """Loss weights and options, from the training flags."""

    weight_desp: float = 1.0
    weight_next_token: float = 1.0
    weight_rank: float = 1.0
    weight_soft_kl: float = 0.0
    weight_in_level: float = 0.0
    continuous_rating_loss: bool = True
    binary_rating_loss: str = "fidelity"
    closeset_rating_loss: bool = False
    use_fix_std: bool = True
    detach_pred_std: bool = False
    soft_kl_closed_set: bool = False
    rank_score_source: str = "tokens"

    @classmethod
    def from_args(cls, args) -> Objective:
        return cls(
            weight_desp=args.weight_desp,
            weight_next_token=args.weight_next_token,
            weight_rank=args.weight_rank,
            weight_soft_kl=args.weight_soft_kl,
            weight_in_level=args.in_level_weight,
            continuous_rating_loss=args.continuous_rating_loss,
            binary_rating_loss=args.binary_rating_loss,
            closeset_rating_loss=args.closeset_rating_loss,
            use_fix_std=args.use_fix_std,
            detach_pred_std=args.detach_pred_std,
            soft_kl_closed_set=args.soft_kl_closed_set,
            rank_score_source=args.rank_score_source,
        )

    @property
    def reads_score_logits(self) -> bool:
        """True when a term of single batches needs the logits at the score positions."""
        return self.weight_soft_kl > 0 or self.weight_in_level > 0


@dataclass
class BatchLoss:
    """The weighted loss of a batch and its unweighted parts (for logging); ``scores`` / ``stds`` [B] are the
    per-row ranking scores of a pair half."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    stds: torch.Tensor | None = None


def _rows(value, rows: list[int]):
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, device=value.device)]
    return [value[row] for row in rows]


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


def open_set_score_and_std(logits: torch.Tensor, score_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected score and std from the full-vocabulary softmax restricted to the score tokens (DeQA without
    ``closeset_rating_loss``): ``p = softmax(logits)[ids]`` is not renormalised. Float32, [N] each."""
    probs = torch.softmax(logits.float(), dim=-1)[:, list(score_token_ids)]
    weights = torch.tensor(SCORE_WEIGHTS, dtype=probs.dtype, device=probs.device)
    score = (probs * weights).sum(dim=-1)
    variance = (probs * (weights - score[:, None]) ** 2).sum(dim=-1)
    return score, variance.clamp_min(0.0).sqrt()


class BatchObjective:
    """Computes :class:`BatchLoss` of single and pair batches for a model with the given score token ids."""

    def __init__(self, objective: Objective, score_token_ids: Sequence[int]):
        if len(score_token_ids) != len(SCORE_WEIGHTS):
            raise QScorerError(f"the model has {len(score_token_ids)} score tokens, the losses need 5")
        self.objective = objective
        self.score_token_ids = list(score_token_ids)

    def __call__(self, model, batch: dict) -> BatchLoss:
        input_type = batch.get("input_type")
        if input_type == "pair":
            return self.pair_loss(model, batch)
        if input_type == "single":
            if self.objective.reads_score_logits:
                return self.task_losses(model, batch)
            return self.dispatcher_loss(model, batch)
        raise QScorerError(f"batch input_type {input_type!r}: expected 'single' or 'pair'")

    def dispatcher_loss(self, model, batch: dict) -> BatchLoss:
        """The model's own dispatcher (``input_type="single"``), weighted by the model config."""
        output = model(**batch)
        parts = {"loss_description": output.loss_description, "loss_score": output.loss_score}
        return BatchLoss(output.loss, {name: value for name, value in parts.items() if value is not None})

    def task_losses(self, model, batch: dict, *, ranking: bool = False) -> BatchLoss:
        """Run the description and score subsets separately and add the terms read at the score positions.

        ``ranking``: every row must be a score record with exactly one score token, whose score / std are returned.
        """
        objective = self.objective
        task_types = list(batch["task_types"])
        weights = {"description": objective.weight_desp, "score": objective.weight_next_token}
        total, parts, scores, stds = None, {}, None, None
        for task in TASKS:
            rows = [row for row, task_type in enumerate(task_types) if task_type == task]
            if not rows:
                continue
            if ranking and task != "score":
                raise QScorerError("pair training needs score records only (a pair item has task_type description)")
            subset = {key: _rows(batch[key], rows) for key in MODEL_INPUTS if batch.get(key) is not None}
            output = model(**subset)
            parts[f"loss_{task}"] = output.loss
            total = _add(total, weights[task] * output.loss)
            if task != "score" or not (objective.reads_score_logits or ranking):
                continue
            positions = output.score_positions
            logits = output.logits[positions[:, 0], positions[:, 1]]
            if objective.weight_soft_kl > 0:
                targets = batch["level_probs"].to(logits.device)[torch.tensor(rows, device=logits.device)]
                kl = soft_label_kl_loss(logits, targets[positions[:, 0]], self.score_token_ids,
                                        closed_set=objective.soft_kl_closed_set)
                parts["loss_soft_kl"] = kl
                total = total + objective.weight_soft_kl * kl
            if objective.weight_in_level > 0:
                in_level = in_level_loss(logits, self.score_token_ids)
                parts["loss_in_level"] = in_level
                total = total + objective.weight_in_level * in_level
            if ranking:
                scores, stds = self._ranking_scores(output, logits, len(rows))
        return BatchLoss(total, parts, scores, stds)

    def _ranking_scores(self, output, logits: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = output.score_positions
        if positions.shape[0] != batch_size or not torch.equal(
            positions[:, 0].cpu(), torch.arange(batch_size)
        ):
            raise QScorerError("pair training needs exactly one score token in the answer of every item")
        if self.objective.closeset_rating_loss:
            scores, stds = score_and_std(logits[:, self.score_token_ids].float())
        else:
            scores, stds = open_set_score_and_std(logits, self.score_token_ids)
        if self.objective.rank_score_source == "head":
            scores = output.score_predictions.float()
        return scores, stds

    def pair_loss(self, model, batch: dict) -> BatchLoss:
        """Loss of both halves plus ``weight_rank`` x the ranking loss between them."""
        objective = self.objective
        halves = {half: self.task_losses(model, batch[f"item_{half}"], ranking=True) for half in ("A", "B")}
        a, b = halves["A"], halves["B"]
        gt_a, gt_b = batch["gt_scores_norm_A"].to(a.scores.device), batch["gt_scores_norm_B"].to(a.scores.device)
        if objective.continuous_rating_loss:
            predicted_stds = {} if objective.use_fix_std else {"std_a": a.stds, "std_b": b.stds}
            rank = continuous_rating_loss(
                a.scores, b.scores, gt_a, gt_b,
                batch["stds_A"].to(gt_a.device), batch["stds_B"].to(gt_a.device),
                **predicted_stds, detach_std=objective.detach_pred_std,
            )
        else:
            rank = binary_rating_loss(a.scores, b.scores, gt_a, gt_b, kind=objective.binary_rating_loss)
        parts = {"loss_rank": rank}
        for half, result in halves.items():
            parts.update({f"{name}_{half}": value for name, value in result.parts.items()})
        return BatchLoss(a.loss + b.loss + objective.weight_rank * rank, parts)
