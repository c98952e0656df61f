"""The training objective of a batch, computed from the model's outputs (the Trainer's ``compute_loss``).

Every batch goes through the model's task-type dispatcher (``input_type="single"``); the terms read at the positions
that predict the score tokens (soft-label KL, in-level loss) and, for pair batches (``input_type="pair"``,
qscorer's working version of the original's dead pair path), the ranking loss between the two halves are added on
top. What each term is, its weight and its options: ``qscorer.model.configuration.OBJECTIVE_DEFAULTS``, read through
``MPLUGOwl2Config.objective`` (training writes them into the config from the flags).
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
from ..model.modeling import TASK_INPUTS


@dataclass
class BatchLoss:
    """The weighted loss of a batch and its unweighted parts (for logging); ``scores`` / ``stds`` [B] are the
    per-row ranking scores of a pair half."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    stds: torch.Tensor | None = None


def open_set_score_and_std(logits: torch.Tensor, rating_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected score and std from the full-vocabulary softmax restricted to the five rating tokens (DeQA without
    ``closeset_rating_loss``): ``p = softmax(logits)[ids]`` is not renormalised. Float32, [N] each."""
    probs = torch.softmax(logits.float(), dim=-1)[:, list(rating_token_ids)]
    weights = torch.tensor(SCORE_WEIGHTS, dtype=probs.dtype, device=probs.device)
    score = (probs * weights).sum(dim=-1)
    variance = (probs * (weights - score[:, None]) ** 2).sum(dim=-1)
    return score, variance.clamp_min(0.0).sqrt()


class BatchObjective:
    """Computes :class:`BatchLoss` of single and pair batches with the objective settings of ``config``.

    The terms read at the rating position use the five rating tokens, excellent first: the model's score tokens, or
    with ``rating_tokens="level_words"`` the ``level_word_ids`` (bad..excellent, as ``level_word_ids(tokenizer)``
    gives them), read where the answer's level word is predicted.
    """

    def __init__(self, config, level_word_ids: Sequence[int] | None = None):
        if config.objective("rating_tokens") == "level_words":
            if level_word_ids is None:
                raise QScorerError("rating_tokens level_words needs the level words' ids (level_word_ids(tokenizer))")
            ids = list(reversed(level_word_ids))
        else:
            ids = list(config.score_token_id)
        if len(ids) != len(SCORE_WEIGHTS):
            raise QScorerError(f"{len(ids)} rating tokens ({config.objective('rating_tokens')}), the losses need 5")
        self.config = config
        self.rating_token_ids = ids

    def __call__(self, model, batch: dict) -> BatchLoss:
        input_type = batch.get("input_type")
        if input_type == "pair":
            return self.pair_loss(model, batch)
        if input_type == "single":
            return self.single_loss(model, batch)
        raise QScorerError(f"batch input_type {input_type!r}: expected 'single' or 'pair'")

    def single_loss(self, model, batch: dict, *, ranking: bool = False) -> BatchLoss:
        """The dispatcher's loss plus the terms read at the score positions.

        ``ranking``: every row must be a score record with exactly one score token, whose score / std are returned.
        """
        setting = self.config.objective
        if ranking and set(batch["task_types"]) != {"score"}:
            raise QScorerError("pair training needs score records only (a pair item has task_type description)")
        inputs = {key: batch[key] for key in TASK_INPUTS if batch.get(key) is not None}
        output = model(input_type="single", task_types=list(batch["task_types"]), **inputs)
        parts = {"loss_description": output.loss_description, "loss_score": output.loss_score}
        parts = {name: value for name, value in parts.items() if value is not None}
        total, scores, stds = output.loss, None, None
        score = output.score_output
        reads_logits = setting("weight_soft_kl") > 0 or setting("weight_in_level") > 0
        if score is None or not (reads_logits or ranking):
            return BatchLoss(total, parts)
        positions = self.rating_positions(score)
        if positions.shape[0] == 0:
            raise QScorerError(
                f"the score records' answers hold none of the rating tokens ({setting('rating_tokens')}) that "
                "--weight_soft_kl / --weight_in_level / the ranking loss read: check --rating_tokens against the data"
            )
        logits = score.logits[positions[:, 0], positions[:, 1]]
        if setting("weight_soft_kl") > 0:
            rows = torch.tensor(output.score_rows, device=logits.device)
            targets = batch["level_probs"].to(logits.device)[rows][positions[:, 0]]
            kl = soft_label_kl_loss(logits, targets, self.rating_token_ids, closed_set=setting("soft_kl_closed_set"))
            parts["loss_soft_kl"] = kl
            total = total + setting("weight_soft_kl") * kl
        if setting("weight_in_level") > 0:
            in_level = in_level_loss(logits, self.rating_token_ids)
            parts["loss_in_level"] = in_level
            total = total + setting("weight_in_level") * in_level
        if ranking:
            scores, stds = self._ranking_scores(score, positions, logits, len(output.score_rows))
        return BatchLoss(total, parts, scores, stds)

    def rating_positions(self, output) -> torch.Tensor:
        """(row, position) pairs of the spliced sequence whose next label is a rating token, [N, 2] (for the score
        tokens, the model's ``score_positions``)."""
        if self.config.objective("rating_tokens") != "level_words":
            return output.score_positions
        ids = torch.tensor(self.rating_token_ids, dtype=output.labels.dtype, device=output.labels.device)
        return torch.isin(output.labels[:, 1:], ids).nonzero()

    def _ranking_scores(
        self, output, positions: torch.Tensor, logits: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.shape[0] != batch_size or not torch.equal(positions[:, 0].cpu(), torch.arange(batch_size)):
            raise QScorerError(
                f"pair training needs exactly one rating token ({self.config.objective('rating_tokens')}) in the "
                "answer of every item"
            )
        if self.config.objective("closeset_rating_loss"):
            scores, stds = score_and_std(logits[:, self.rating_token_ids].float())
        else:
            scores, stds = open_set_score_and_std(logits, self.rating_token_ids)
        if self.config.objective("rank_score_source") == "head":
            scores = output.score_predictions.float()
        return scores, stds

    def pair_loss(self, model, batch: dict) -> BatchLoss:
        """Loss of both halves plus ``weight_rank`` x the ranking loss between them."""
        setting = self.config.objective
        halves = {half: self.single_loss(model, batch[f"item_{half}"], ranking=True) for half in ("A", "B")}
        a, b = halves["A"], halves["B"]
        gt_a, gt_b = batch["gt_scores_norm_A"].to(a.scores.device), batch["gt_scores_norm_B"].to(a.scores.device)
        if setting("continuous_rating_loss"):
            predicted_stds = {} if setting("use_fix_std") else {"std_a": a.stds, "std_b": b.stds}
            rank = continuous_rating_loss(
                a.scores,
                b.scores,
                gt_a,
                gt_b,
                batch["stds_A"].to(gt_a.device),
                batch["stds_B"].to(gt_a.device),
                **predicted_stds,
                detach_std=setting("detach_pred_std"),
            )
        else:
            rank = binary_rating_loss(a.scores, b.scores, gt_a, gt_b, kind=setting("binary_rating_loss"))
        parts = {"loss_rank": rank}
        for half, result in halves.items():
            parts.update({f"{name}_{half}": value for name, value in result.parts.items()})
        return BatchLoss(a.loss + b.loss + setting("weight_rank") * rank, parts)
