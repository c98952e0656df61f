"""Score-token and pair losses of the DeQA-Score family, made runnable for Q-Scorer.

The original Q-Scorer ships a pair dataset and pair-loss flags but cannot run them (its collator cannot read the
pair items and its model has no pair branch); these functions implement the parent's formulas as pure, batched
torch functions. Conventions shared by all of them:

- Score-token logits/probabilities are listed excellent-first, ``<score5>, <score4>, ..., <score1>``, i.e. in the
  order of the model's ``score_token_id`` list (ids 32004..32000 with the 7B tokenizer) and of DeQA's
  ``level_probs``; their weights are :data:`SCORE_WEIGHTS` = ``(5, 4, 3, 2, 1)``.
- Per-item inputs are 1-D tensors of shape ``[B]`` (scores, stds) or ``[B, 5]`` / ``[B, V]`` (logits, targets).
- Softmax, erf and square roots run in float32 (or float64 when the inputs are float64): in bf16/fp16 the erf of a
  small score difference and ``sqrt(p * g + 1e-8)`` lose most of their digits and the 1e-8 guards vanish. Results are
  cast back to the dtype of the (first) prediction input, and gradients flow through that cast.
- Targets (ground-truth preferences, soft labels) are treated as constants: no gradient flows into them.

The regression term of Q-Scorer itself (sum of squared errors of the clamped head output over the batch size)
belongs to the model and is not repeated here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
"""Score value of each score token, excellent-first (``<score5>`` .. ``<score1>``)."""

VARIANCE_EPS = 1e-8
"""Added to the summed variances under the Thurstone square root (DeQA: without it the step can stall at 0)."""

FIDELITY_EPS = 1e-8
"""Added under each square root of the fidelity loss."""

IN_LEVEL_FLOOR = 0.01
"""Lower bound of the in-level loss: once 99 % of the mass sits on the score tokens it stops pushing."""

BINARY_RATING_KINDS = ("fidelity", "bce")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every formula here is evaluated in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_score_logits(logits: torch.Tensor, name: str) -> None:
    if logits.shape[-1] != len(SCORE_WEIGHTS):
        raise ValueError(
            f"{name} must have {len(SCORE_WEIGHTS)} entries in its last dimension, got {tuple(logits.shape)}"
        )


def score_and_std(score_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected score and its standard deviation from the five score-token logits (DeQA's ``get_score``).

    ``p = softmax(score_logits)`` over the five tokens only (closed set), ``score = sum(p * w)`` and
    ``std = sqrt(sum(p * (w - score)^2))`` with ``w = (5, 4, 3, 2, 1)``. ``score_logits`` is ``[..., 5]``,
    excellent-first; both outputs have its leading shape and dtype (computed in float32).
    """
    _check_score_logits(score_logits, "score_logits")
    dtype = _compute_dtype(score_logits)
    probs = torch.softmax(score_logits.to(dtype), dim=-1)
    weights = torch.tensor(SCORE_WEIGHTS, dtype=dtype, device=score_logits.device)
    score = (probs * weights).sum(dim=-1)
    variance = (probs * (weights - score.unsqueeze(-1)) ** 2).sum(dim=-1)
    return score.to(score_logits.dtype), variance.sqrt().to(score_logits.dtype)


def thurstone_preference(
    score_a: torch.Tensor,
    score_b: torch.Tensor,
    std_a: torch.Tensor | None = None,
    std_b: torch.Tensor | None = None,
    *,
    detach_std: bool = False,
) -> torch.Tensor:
    """Probability that item A is better than item B under Thurstone's model.

    Without stds (DeQA's ``use_fix_std``; both items have unit std): ``p = 0.5 * (1 + erf((sA - sB) / 2))``,
    i.e. ``Phi((sA - sB) / sqrt(2))``. With stds:
    ``p = 0.5 * (1 + erf((sA - sB) / sqrt(2 * (stdA^2 + stdB^2 + 1e-8))))``; ``detach_std`` stops the gradient
    through the stds (DeQA's ``detach_pred_std``). The same formula with ground-truth scores and stds gives the
    target preference of :func:`continuous_rating_loss`. Computed in float32, returned in ``score_a``'s dtype.
    """
    if (std_a is None) != (std_b is None):
        raise ValueError("pass both std_a and std_b, or neither (unit stds)")
    dtype = _compute_dtype(score_a, score_b)
    diff = score_a.to(dtype) - score_b.to(dtype)
    if std_a is None:
        denominator = torch.tensor(2.0, dtype=dtype, device=diff.device)
    else:
        variance = std_a.to(dtype) ** 2 + std_b.to(dtype) ** 2 + VARIANCE_EPS
        if detach_std:
            variance = variance.detach()
        denominator = torch.sqrt(2.0 * variance)
    return (0.5 * (1.0 + torch.erf(diff / denominator))).to(score_a.dtype)


def continuous_rating_loss(
    score_a: torch.Tensor,
    score_b: torch.Tensor,
    gt_a: torch.Tensor,
    gt_b: torch.Tensor,
    gt_std_a: torch.Tensor,
    gt_std_b: torch.Tensor,
    std_a: torch.Tensor | None = None,
    std_b: torch.Tensor | None = None,
    *,
    detach_std: bool = False,
) -> torch.Tensor:
    """Fidelity loss between predicted and ground-truth Thurstone preferences (DeQA's ``rating_loss``).

    ``p = thurstone_preference(sA, sB, stdA, stdB)`` (unit stds when ``std_a``/``std_b`` are None),
    ``g = 0.5 * (1 + erf((gA - gB) / sqrt(2 * (gstdA^2 + gstdB^2 + 1e-8))))`` (a constant), and
    ``loss = mean(1 - sqrt(p * g + 1e-8) - sqrt((1 - p) * (1 - g) + 1e-8))``. It is about 0 when ``p == g`` (the
    guards make it slightly negative: -2e-8 at p = g = 0.5, -1e-4 at p = g = 0 or 1). Computed in float32; a 0-d
    tensor in ``score_a``'s dtype.
    """
    dtype = _compute_dtype(score_a, score_b)
    pred = thurstone_preference(score_a.to(dtype), score_b.to(dtype), std_a, std_b, detach_std=detach_std)
    with torch.no_grad():
        target = thurstone_preference(gt_a.to(dtype), gt_b.to(dtype), gt_std_a.to(dtype), gt_std_b.to(dtype))
    fidelity = torch.sqrt(pred * target + FIDELITY_EPS) + torch.sqrt((1.0 - pred) * (1.0 - target) + FIDELITY_EPS)
    return (1.0 - fidelity).mean().to(score_a.dtype)


def binary_rating_loss(
    score_a: torch.Tensor,
    score_b: torch.Tensor,
    gt_a: torch.Tensor,
    gt_b: torch.Tensor,
    *,
    kind: str = "fidelity",
) -> torch.Tensor:
    """Pairwise ranking loss against the hard label ``g = 1[gA > gB]`` (DeQA's ``binary_rating_loss``).

    ``p = 0.5 * (1 + erf((sA - sB) / 2))`` (unit stds, as in DeQA). ``kind="bce"``: mean binary cross-entropy of
    ``p`` against ``g`` (torch clamps each log at -100). ``kind="fidelity"``:
    ``(sum over g=1 of (1 - sqrt(p)) + sum over g=0 of (1 - sqrt(1 - p))) / B``; it has no epsilon, so its gradient
    is infinite if ``p`` rounds to exactly 0 (g=1) or 1 (g=0), which needs a score gap above ~7.8 in float32
    (impossible for scores on the 1..5 scale).
    Ties (``gA == gB``) count as ``g = 0``. Computed in float32; a 0-d tensor in ``score_a``'s dtype.
    """
    if kind not in BINARY_RATING_KINDS:
        raise ValueError(f"unknown binary rating loss {kind!r}; expected one of {BINARY_RATING_KINDS}")
    dtype = _compute_dtype(score_a, score_b)
    pred = thurstone_preference(score_a.to(dtype), score_b.to(dtype))
    target = (gt_a > gt_b).to(dtype)
    if kind == "bce":
        loss = F.binary_cross_entropy(pred, target)
    else:
        better = target > 0.5
        loss = ((1.0 - pred[better].sqrt()).sum() + (1.0 - (1.0 - pred[~better]).sqrt()).sum()) / pred.shape[0]
    return loss.to(score_a.dtype)


def _score_log_probs(logits: torch.Tensor, score_token_ids: list[int] | torch.Tensor | None, closed_set: bool):
    """Log-probabilities of the five score tokens, in the compute dtype."""
    dtype = _compute_dtype(logits)
    logits = logits.to(dtype)
    if score_token_ids is None:
        _check_score_logits(logits, "logits")
        if not closed_set:
            raise ValueError("closed_set=False needs the full-vocabulary logits and score_token_ids")
        return torch.log_softmax(logits, dim=-1)
    ids = torch.as_tensor(score_token_ids, dtype=torch.long, device=logits.device)
    if ids.numel() != len(SCORE_WEIGHTS):
        raise ValueError(f"score_token_ids must hold {len(SCORE_WEIGHTS)} ids (excellent-first), got {ids.tolist()}")
    if closed_set:
        return torch.log_softmax(logits[..., ids], dim=-1)
    return torch.log_softmax(logits, dim=-1)[..., ids]


def soft_label_kl_loss(
    logits: torch.Tensor,
    level_probs: torch.Tensor,
    score_token_ids: list[int] | torch.Tensor | None = None,
    *,
    closed_set: bool = True,
) -> torch.Tensor:
    """KL(target || predicted) between a soft label and the score-token distribution, mean over the batch.

    ``level_probs`` is ``[B, 5]``, excellent-first like ``score_token_ids`` (e.g. the model's
    ``[<score5> .. <score1>]`` ids), as written by the DeQA soft-label builder. Per sample
    ``KL = sum_k t_k * (log t_k - log q_k)`` with ``0 * log 0 = 0``; the result is the batch mean (``batchmean``).

    ``logits`` is either the five score-token logits ``[B, 5]`` (``score_token_ids`` None) or full-vocabulary
    logits ``[B, V]`` at the score position together with ``score_token_ids``.

    ``closed_set=True`` (default): ``q = softmax`` over the five score tokens only, so the KL matches only the shape
    of the distribution and is 0 when it equals the target; keeping the probability mass on the score tokens is the
    job of :func:`in_level_loss`. ``closed_set=False`` reproduces DeQA's ``softkl_loss``, whose softmax runs over the
    whole vocabulary; that equals the closed-set KL plus ``-log(mass on the five tokens)``.
    Computed in float32; a 0-d tensor in ``logits``' dtype.
    """
    log_q = _score_log_probs(logits, score_token_ids, closed_set)
    target = level_probs.to(device=log_q.device, dtype=log_q.dtype).detach()
    if target.shape != log_q.shape:
        raise ValueError(f"level_probs shape {tuple(target.shape)} does not match the scores {tuple(log_q.shape)}")
    cross = torch.where(target > 0, target * log_q, torch.zeros_like(log_q))
    per_sample = (torch.xlogy(target, target) - cross).sum(dim=-1)
    return per_sample.mean().to(logits.dtype)


def in_level_loss(logits: torch.Tensor, score_token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """DeQA's in-level loss: ``max(0.01, mean_b(1 - sum of softmax(logits_b)[score_token_ids]))``.

    ``logits`` is ``[B, V]`` (full vocabulary, at the position that predicts the score token); the softmax is open
    set. The 0.01 floor stops the push once 99 % of the mass sits on the score tokens (zero gradient below it).
    Computed in float32; a 0-d tensor in ``logits``' dtype.
    """
    probs = _score_log_probs(logits, score_token_ids, closed_set=False).exp()
    outside = (1.0 - probs.sum(dim=-1)).mean()
    return torch.clamp(outside, min=IN_LEVEL_FLOOR).to(logits.dtype)


__all__ = [
    "SCORE_WEIGHTS",
    "binary_rating_loss",
    "continuous_rating_loss",
    "in_level_loss",
    "score_and_std",
    "soft_label_kl_loss",
    "thurstone_preference",
]
