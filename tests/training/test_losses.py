"""Loss functions against hand-computed values (expected numbers come from `math`, not the code under test)."""

import math

import pytest
import torch

from astrai_ds.model.losses import IGNORE_INDEX, sequence_logps, token_counts, token_cross_entropy
from astrai_ds.training.losses import DPO_LOSSES, dpo_loss

# Two pairs of summed log-probs. h = (pc - pr) - (rc - rr) = 0.7 and -0.7.
PC, PR, RC, RR = [-10.0, -12.5], [-11.0, -12.0], [-10.5, -12.0], [-10.8, -12.2]
BETA = 0.1


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def h_values() -> list[float]:
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def tensors():
    return [torch.tensor(v) for v in (PC, PR, RC, RR)]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_sigmoid_matches_hand_computed():
    loss, _, _ = dpo_loss(*tensors(), BETA)
    expected = mean([-logsigmoid(BETA * h) for h in h_values()])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_sigmoid_label_smoothing_matches_hand_computed():
    eps = 0.2
    loss, _, _ = dpo_loss(*tensors(), BETA, "sigmoid", eps)
    expected = mean([-logsigmoid(BETA * h) * (1 - eps) - logsigmoid(-BETA * h) * eps for h in h_values()])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_zero_label_smoothing_equals_plain():
    plain = dpo_loss(*tensors(), BETA)
    smoothed = dpo_loss(*tensors(), BETA, "sigmoid", 0.0)
    for a, b in zip(plain, smoothed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ipo_matches_hand_computed():
    loss, _, _ = dpo_loss(*tensors(), BETA, "ipo")
    expected = mean([(h - 1 / (2 * BETA)) ** 2 for h in h_values()])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hinge_matches_hand_computed():
    beta = 2.0  # large enough that one pair is past the hinge (1 - 2 * 0.7 < 0) and one is not
    loss, _, _ = dpo_loss(*tensors(), beta, "hinge")
    expected = mean([max(0.0, 1 - beta * h) for h in h_values()])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_simpo_is_reference_free_and_matches_hand_computed():
    beta, gamma = 2.0, 0.8
    avg_c, avg_r = [-1.2, -0.9], [-1.5, -0.7]  # average log-probs per response token
    loss, chosen, rejected = dpo_loss(torch.tensor(avg_c), torch.tensor(avg_r), None, None, beta, "simpo",
                                      gamma=gamma)
    expected = mean([-logsigmoid(beta * (c - r) - gamma) for c, r in zip(avg_c, avg_r)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(chosen, beta * torch.tensor(avg_c))
    torch.testing.assert_close(rejected, beta * torch.tensor(avg_r))
    # the reference, when given, is ignored
    with_ref = dpo_loss(torch.tensor(avg_c), torch.tensor(avg_r), torch.zeros(2) + 5, torch.zeros(2) - 5, beta,
                        "simpo", gamma=gamma)[0]
    torch.testing.assert_close(with_ref, loss)


def test_rewards_are_beta_times_policy_minus_reference_and_detached():
    pc, pr, rc, rr = tensors()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, BETA)
    torch.testing.assert_close(chosen, torch.tensor([BETA * (p - r) for p, r in zip(PC, RC)]))
    torch.testing.assert_close(rejected, torch.tensor([BETA * (p - r) for p, r in zip(PR, RR)]))
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/d pc of mean(-logsigmoid(beta h)) = -beta * sigmoid(-beta h) / N
    expected = [-BETA * (1 - 1 / (1 + math.exp(-BETA * h))) / 2 for h in h_values()]
    torch.testing.assert_close(pc.grad, torch.tensor(expected))
    torch.testing.assert_close(pr.grad, -torch.tensor(expected))


def test_identical_policy_and_reference_give_log_two():
    x = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = dpo_loss(x, x + 1, x, x + 1, 0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_registry_matches_the_config_and_the_config_validates_once():
    """The config layer lists the loss types (and validates them); the registry must implement exactly those."""
    from astrai_ds.config.base import from_dict
    from astrai_ds.config.train import DPO_LOSS_TYPES, DPOConfig
    from astrai_ds.errors import ConfigError

    assert set(DPO_LOSSES) == set(DPO_LOSS_TYPES)
    with pytest.raises(ConfigError, match="dpo.loss_type.*sigmoid"):
        from_dict(DPOConfig, {"loss_type": "kto-ish"}, "cfg.json", prefix="dpo.")
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        from_dict(DPOConfig, {"loss_type": "ipo", "label_smoothing": 0.1}, "cfg.json", prefix="dpo.")
    with pytest.raises(ConfigError, match="dpo.gamma.*SimPO"):
        from_dict(DPOConfig, {"loss_type": "sigmoid", "gamma": 1.0}, "cfg.json", prefix="dpo.")
    assert from_dict(DPOConfig, {"loss_type": "simpo", "gamma": 1.5, "label_smoothing": 0.1}, "x").gamma == 1.5


def test_reference_needed():
    pc, pr, _, _ = tensors()
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pc, pr, None, None, BETA, "sigmoid")


def test_sum_reduction_is_the_mean_times_the_pairs():
    mean, _, _ = dpo_loss(*tensors(), BETA, "sigmoid")
    total, _, _ = dpo_loss(*tensors(), BETA, "sigmoid", reduction="sum")
    torch.testing.assert_close(total, mean * len(tensors()[0]))


# ---- sequence log-probs ---------------------------------------------------------------------------

def test_sequence_logps_equals_manual_loop():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 6, 11
    logits = torch.randn(N, T, V, generator=g) * 3
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    expected = []
    for n in range(N):
        total = 0.0
        for t in range(T):
            y = int(labels[n, t])
            if y == IGNORE_INDEX:
                continue
            row = [float(v) for v in logits[n, t]]
            log_z = math.log(sum(math.exp(v) for v in row))
            total += row[y] - log_z
        expected.append(total)
    out = sequence_logps(logits, labels)
    assert out.shape == (N,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert out[2].item() == 0.0
    assert token_counts(labels).tolist() == [T - 2, 4, 0]


def test_sequence_logps_bf16_logits_and_finite_gradients():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 7, generator=g)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 0, 6, 3, 4]])
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sequence_logps(logits.detach().float(), labels))
    out.sum().backward()
    assert torch.isfinite(logits.grad.float()).all()
    assert logits.grad[0, 2:].abs().max() == 0  # ignored positions get no gradient


def test_token_cross_entropy_mean_over_trained_tokens_and_empty_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, 0], [IGNORE_INDEX, IGNORE_INDEX, 4, 2]])
    expected = -sequence_logps(logits, labels).sum() / 5
    torch.testing.assert_close(token_cross_entropy(logits, labels), expected)
    empty = torch.full_like(labels, IGNORE_INDEX)
    leaf = logits.clone().requires_grad_(True)
    loss = token_cross_entropy(leaf, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(leaf.grad).all()
