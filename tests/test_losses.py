"""Score-token and pair losses: every formula against numbers computed by hand with ``math``."""

import math

import pytest
import torch

from qscorer.data.losses import (
    SCORE_WEIGHTS,
    binary_rating_loss,
    continuous_rating_loss,
    in_level_loss,
    score_and_std,
    soft_label_kl_loss,
    thurstone_preference,
)


def phi_pref(diff, denominator):
    """0.5 * (1 + erf(diff / denominator)), by hand."""
    return 0.5 * (1.0 + math.erf(diff / denominator))


def fidelity(p, g):
    return 1.0 - math.sqrt(p * g + 1e-8) - math.sqrt((1.0 - p) * (1.0 - g) + 1e-8)


def log_tensor(probs, dtype=torch.float32):
    return torch.tensor([[math.log(p) for p in row] for row in probs], dtype=dtype)


# ---------------------------------------------------------------- score and std


def test_score_weights_are_excellent_first():
    assert SCORE_WEIGHTS == (5.0, 4.0, 3.0, 2.0, 1.0)


def test_score_and_std_hand_values():
    probs = [[0.2] * 5, [0.1, 0.2, 0.4, 0.2, 0.1], [0.6, 0.3, 0.05, 0.03, 0.02]]
    score, std = score_and_std(log_tensor(probs))
    third_mean = 0.6 * 5 + 0.3 * 4 + 0.05 * 3 + 0.03 * 2 + 0.02 * 1  # 4.43
    third_var = sum(p * (w - third_mean) ** 2 for p, w in zip(probs[2], (5, 4, 3, 2, 1)))
    assert score.tolist() == pytest.approx([3.0, 3.0, 4.43], abs=1e-6)
    assert std.tolist() == pytest.approx([math.sqrt(2.0), math.sqrt(1.2), math.sqrt(third_var)], abs=1e-6)


def test_score_and_std_is_a_closed_set_softmax():
    logits = log_tensor([[0.6, 0.3, 0.05, 0.03, 0.02]])
    shifted_score, shifted_std = score_and_std(logits + 37.0)
    score, std = score_and_std(logits)
    assert shifted_score.item() == pytest.approx(score.item(), abs=1e-5)
    assert shifted_std.item() == pytest.approx(std.item(), abs=1e-5)


def test_score_and_std_one_hot_and_leading_dims():
    logits = torch.full((2, 3, 5), -1e4)
    logits[..., 1] = 0.0  # all mass on <score4>
    score, std = score_and_std(logits)
    assert score.shape == (2, 3) and std.shape == (2, 3)
    assert torch.allclose(score, torch.full((2, 3), 4.0))
    assert torch.allclose(std, torch.zeros(2, 3), atol=1e-6)


def test_score_and_std_dtype_and_gradient():
    logits = torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True)
    score, std = score_and_std(logits)
    assert score.dtype == torch.bfloat16 and std.dtype == torch.bfloat16
    (score.float().sum() + std.float().sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="5 entries"):
        score_and_std(torch.zeros(2, 4))


# ---------------------------------------------------------------- Thurstone preference


def test_thurstone_preference_fixed_std_hand_values():
    p = thurstone_preference(torch.tensor([3.5, 2.0, 1.0]), torch.tensor([2.5, 2.0, 4.2]))
    expected = [phi_pref(1.0, 2.0), 0.5, phi_pref(-3.2, 2.0)]
    assert p.tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[0] == pytest.approx(0.7602499389, abs=1e-9)  # 0.5 * (1 + erf(0.5))


def test_thurstone_preference_with_stds_hand_values():
    p = thurstone_preference(
        torch.tensor([3.5, 3.0]), torch.tensor([2.5, 3.0]), torch.tensor([0.5, 0.2]), torch.tensor([0.7, 0.9])
    )
    expected = [phi_pref(1.0, math.sqrt(2 * (0.25 + 0.49 + 1e-8))), 0.5]
    assert p.tolist() == pytest.approx(expected, abs=1e-7)


def test_thurstone_preference_detach_std_and_errors():
    score_a = torch.tensor([3.0, 4.0], requires_grad=True)
    std_a = torch.tensor([0.5, 0.6], requires_grad=True)
    thurstone_preference(
        score_a, torch.tensor([2.0, 2.0]), std_a, torch.tensor([0.4, 0.4]), detach_std=True
    ).sum().backward()
    assert score_a.grad is not None and std_a.grad is None
    thurstone_preference(score_a, torch.tensor([2.0, 2.0]), std_a, torch.tensor([0.4, 0.4])).sum().backward()
    assert std_a.grad is not None and (std_a.grad < 0).all()  # a wider spread pulls p towards 0.5
    with pytest.raises(ValueError, match="both"):
        thurstone_preference(score_a, score_a, std_a, None)


# ---------------------------------------------------------------- continuous (fidelity) rating loss


def test_continuous_rating_loss_fixed_std_hand_value():
    s_a, s_b = [4.0, 2.0, 3.0], [3.0, 2.5, 3.0]
    g_a, g_b = [3.2, 1.5, 4.0], [3.0, 2.5, 4.0]
    gs_a, gs_b = [0.4, 0.6, 0.5], [0.3, 0.2, 0.1]
    loss = continuous_rating_loss(*(torch.tensor(v) for v in (s_a, s_b, g_a, g_b, gs_a, gs_b)))
    expected = 0.0
    for sa, sb, ga, gb, qa, qb in zip(s_a, s_b, g_a, g_b, gs_a, gs_b):
        p = phi_pref(sa - sb, 2.0)
        g = phi_pref(ga - gb, math.sqrt(2 * (qa * qa + qb * qb + 1e-8)))
        expected += fidelity(p, g) / 3
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_continuous_rating_loss_predicted_std_hand_value():
    loss = continuous_rating_loss(
        torch.tensor([3.6]),
        torch.tensor([3.1]),
        torch.tensor([2.0]),
        torch.tensor([2.4]),
        torch.tensor([0.5]),
        torch.tensor([0.5]),
        torch.tensor([0.3]),
        torch.tensor([0.8]),
    )
    p = phi_pref(0.5, math.sqrt(2 * (0.09 + 0.64 + 1e-8)))
    g = phi_pref(-0.4, math.sqrt(2 * (0.25 + 0.25 + 1e-8)))
    assert loss.item() == pytest.approx(fidelity(p, g), abs=1e-6)


def test_continuous_rating_loss_is_zero_when_prediction_matches_target():
    scores = torch.tensor([3.0, 4.5, 1.2, 2.2])
    others = torch.tensor([3.0, 2.0, 1.9, 4.9])
    unit = torch.ones(4)
    # unit ground-truth stds: the target equals the fixed-std prediction (up to the 1e-8 variance guard)
    loss = continuous_rating_loss(scores, others, scores, others, unit, unit)
    assert abs(loss.item()) < 1e-6
    half = continuous_rating_loss(scores[:1], others[:1], scores[:1], others[:1], unit[:1], unit[:1])
    assert half.item() == pytest.approx(fidelity(0.5, 0.5), abs=1e-7)  # equal scores: p = g = 0.5 (-2e-8)


def test_continuous_rating_loss_gradients():
    score_a = torch.tensor([3.0, 2.0], requires_grad=True)
    score_b = torch.tensor([2.0, 3.5], requires_grad=True)
    std_a = torch.tensor([0.5, 0.4], requires_grad=True)
    std_b = torch.tensor([0.6, 0.3], requires_grad=True)
    gt_a = torch.tensor([2.0, 4.0], requires_grad=True)
    gt = (gt_a, torch.tensor([3.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    continuous_rating_loss(score_a, score_b, *gt, std_a, std_b).backward()
    for tensor in (score_a, score_b, std_a, std_b):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert gt_a.grad is None  # the target is a constant
    # each predicted order disagrees with its target, so descent moves the scores towards the target order
    assert score_a.grad[0] > 0 and score_b.grad[0] < 0  # pair 0: predicted A > B, target B > A
    assert score_a.grad[1] < 0 and score_b.grad[1] > 0  # pair 1: predicted B > A, target A > B


def test_continuous_rating_loss_detach_std():
    std_a = torch.tensor([0.5], requires_grad=True)
    loss = continuous_rating_loss(
        torch.tensor([3.0], requires_grad=True),
        torch.tensor([2.0]),
        torch.tensor([2.0]),
        torch.tensor([3.0]),
        torch.tensor([0.5]),
        torch.tensor([0.5]),
        std_a,
        torch.tensor([0.6]),
        detach_std=True,
    )
    loss.backward()
    assert std_a.grad is None


def test_continuous_rating_loss_gradcheck_float64():
    inputs = [
        torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for v in ([3.1, 1.7], [2.4, 2.9], [0.6, 0.4], [0.3, 0.5])
    ]
    gt = [torch.tensor(v, dtype=torch.float64) for v in ([3.0, 2.0], [2.0, 2.5], [0.4, 0.4], [0.3, 0.6])]

    def func(score_a, score_b, std_a, std_b):
        return continuous_rating_loss(score_a, score_b, *gt, std_a, std_b)

    assert torch.autograd.gradcheck(func, inputs)
    assert func(*inputs).dtype == torch.float64


def test_continuous_rating_loss_keeps_low_precision_dtype():
    bf16 = [torch.tensor(v, dtype=torch.bfloat16) for v in ([3.0, 2.0], [2.0, 3.0])]
    gt = [torch.tensor(v) for v in ([3.0, 2.0], [2.0, 3.0], [0.5, 0.5], [0.5, 0.5])]
    loss = continuous_rating_loss(*bf16, *gt)
    assert loss.dtype == torch.bfloat16


# ---------------------------------------------------------------- binary rating loss


BINARY_CASE = ([4.0, 2.0, 3.0, 1.5], [3.0, 3.0, 3.0, 4.5], [4.2, 3.0, 2.0, 2.0], [3.9, 2.5, 2.0, 4.0])


def test_binary_rating_loss_bce_hand_value():
    s_a, s_b, g_a, g_b = BINARY_CASE
    loss = binary_rating_loss(*(torch.tensor(v) for v in BINARY_CASE), kind="bce")
    expected = 0.0
    for sa, sb, ga, gb in zip(s_a, s_b, g_a, g_b):
        p = phi_pref(sa - sb, 2.0)
        g = 1.0 if ga > gb else 0.0  # the tie in pair 2 counts as "A not better"
        expected -= (g * math.log(p) + (1 - g) * math.log(1 - p)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_binary_rating_loss_fidelity_hand_value():
    s_a, s_b, g_a, g_b = BINARY_CASE
    loss = binary_rating_loss(*(torch.tensor(v) for v in BINARY_CASE))  # default kind: fidelity
    total = 0.0
    for sa, sb, ga, gb in zip(s_a, s_b, g_a, g_b):
        p = phi_pref(sa - sb, 2.0)
        total += (1 - math.sqrt(p)) if ga > gb else (1 - math.sqrt(1 - p))
    assert loss.item() == pytest.approx(total / 4, abs=1e-6)


def test_binary_rating_loss_equal_scores_and_gradients():
    for kind, expected in (("bce", math.log(2.0)), ("fidelity", 1 - math.sqrt(0.5))):
        score_a = torch.tensor([2.5, 3.0], requires_grad=True)
        loss = binary_rating_loss(
            score_a, torch.tensor([2.5, 3.0]), torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0]), kind=kind
        )
        assert loss.item() == pytest.approx(expected, abs=1e-6)  # p = 0.5 whatever the label
        loss.backward()
        assert score_a.grad[0] < 0 and score_a.grad[1] > 0  # push A up where A is better, down where it is worse


def test_binary_rating_loss_rejects_unknown_kind():
    one = torch.ones(1)
    with pytest.raises(ValueError, match="hinge"):
        binary_rating_loss(one, one, one, one, kind="hinge")


# ---------------------------------------------------------------- soft-label KL


def test_soft_label_kl_hand_value_closed_set():
    logits = log_tensor([[0.4, 0.4, 0.1, 0.05, 0.05], [0.1, 0.2, 0.4, 0.2, 0.1]])
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.25, 0.5, 0.25, 0.0]])
    first = 2 * 0.5 * math.log(0.5 / 0.4)
    second = 2 * 0.25 * math.log(0.25 / 0.2) + 0.5 * math.log(0.5 / 0.4)
    loss = soft_label_kl_loss(logits, target)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_soft_label_kl_is_zero_for_identical_distributions():
    probs = [[0.7, 0.2, 0.05, 0.03, 0.02]]
    assert abs(soft_label_kl_loss(log_tensor(probs) + 5.0, torch.tensor(probs)).item()) < 1e-6


def test_soft_label_kl_open_set_matches_deqa():
    # vocabulary of 8; score tokens <score5>..<score1> at ids 7, 6, 5, 4, 3 hold 80 % of the mass
    vocab_probs = [0.05, 0.1, 0.05, 0.08, 0.08, 0.16, 0.24, 0.24]
    logits = log_tensor([vocab_probs])
    ids = [7, 6, 5, 4, 3]
    target = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.1]])
    closed = [0.3, 0.3, 0.2, 0.1, 0.1]  # 0.24/0.8, 0.24/0.8, 0.16/0.8, 0.08/0.8, 0.08/0.8
    kl_closed = sum(t * math.log(t / q) for t, q in zip([0.3, 0.3, 0.2, 0.1, 0.1], closed))
    assert kl_closed == pytest.approx(0.0, abs=1e-12)
    assert soft_label_kl_loss(logits, target, ids).item() == pytest.approx(0.0, abs=1e-6)
    open_value = sum(t * math.log(t / vocab_probs[i]) for t, i in zip([0.3, 0.3, 0.2, 0.1, 0.1], ids))
    assert open_value == pytest.approx(-math.log(0.8), abs=1e-9)
    assert soft_label_kl_loss(logits, target, ids, closed_set=False).item() == pytest.approx(open_value, abs=1e-6)


def test_soft_label_kl_zero_targets_and_gradients():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), -1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.6, 0.4, 0.0, 0.0, 0.0]])
    loss = soft_label_kl_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # d KL / d logit_k = q_k - t_k for a closed-set softmax
    q = [math.exp(v) for v in (2.0, 1.0, -1.0, 0.0)]
    q = [v / sum(q) for v in q]
    expected_grad = [q[0] - 0.6, q[1] - 0.4, 0.0, q[2], q[3]]
    assert logits.grad[0].tolist() == pytest.approx(expected_grad, abs=1e-6)


def test_soft_label_kl_dtype_and_errors():
    logits = torch.zeros(3, 5, dtype=torch.bfloat16)
    target = torch.full((3, 5), 0.2)
    loss = soft_label_kl_loss(logits, target)
    assert loss.dtype == torch.bfloat16 and abs(loss.item()) < 1e-6
    with pytest.raises(ValueError, match="full-vocabulary"):
        soft_label_kl_loss(torch.zeros(1, 5), torch.full((1, 5), 0.2), closed_set=False)
    with pytest.raises(ValueError, match="does not match"):
        soft_label_kl_loss(torch.zeros(2, 5), torch.full((1, 5), 0.2))
    with pytest.raises(ValueError, match="5 ids"):
        soft_label_kl_loss(torch.zeros(1, 9), torch.full((1, 5), 0.2), [1, 2, 3])


# ---------------------------------------------------------------- in-level loss


def test_in_level_loss_hand_values_and_floor():
    ids = [4, 3, 2, 1, 0]
    first = [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]  # 90 % on the score tokens -> 0.1 outside
    second = [0.3, 0.2, 0.1, 0.1, 0.0999, 0.2001]  # 79.99 % -> 0.2001 outside
    loss = in_level_loss(log_tensor([first, second]), ids)
    assert loss.item() == pytest.approx((0.1 + 0.2001) / 2, abs=1e-6)
    nearly_all = log_tensor([[0.2, 0.2, 0.2, 0.2, 0.199, 0.001]])
    floored = in_level_loss(nearly_all.requires_grad_(), ids)
    assert floored.item() == pytest.approx(0.01, abs=1e-7)


def test_in_level_loss_gradient_pushes_mass_onto_score_tokens():
    logits = torch.zeros(2, 7, requires_grad=True)
    in_level_loss(logits, [0, 1, 2, 3, 4]).backward()
    assert (logits.grad[:, :5] < 0).all() and (logits.grad[:, 5:] > 0).all()
