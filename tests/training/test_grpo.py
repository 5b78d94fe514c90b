"""GRPO's arithmetic against a direct, token-by-token implementation of its formulas on fixed tensors: the group
advantages, the clipped ratio with separate low and high clip, the k3 KL term and the token-level aggregation over
the whole global batch (the same loss and gradient however the batch is split)."""

from __future__ import annotations

import math

import pytest
import torch

from astrai_ds.config.train import GRPOConfig
from astrai_ds.model.losses import IGNORE_INDEX
from astrai_ds.training.rollout import completion_rows, completion_seed, group_advantages
from astrai_ds.training.strategies import GRPOStrategy

V, T = 11, 7


def direct_advantages(rewards: list[list[float]], scale: bool, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # unbiased, as TRL's torch.std
        out.append([(r - mean) / (std + eps) if scale else r - mean for r in group])
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_are_the_reward_minus_the_group_mean_over_its_std(scale):
    rewards = [[1.0, 0.0, 0.5, 1.5], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 1.0]]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), scale, 1e-4)
    assert torch.allclose(got, torch.tensor(direct_advantages(rewards, scale, 1e-4), dtype=torch.float64),
                          atol=1e-12, rtol=0)
    assert got[1].tolist() == [0.0] * 4  # a group whose rewards are all equal carries no signal


def direct_loss(logits, labels, old, ref, adv, cfg: GRPOConfig, total_tokens: int) -> torch.Tensor:
    """sum over trained tokens of -min(r A, clip(r) A) + beta k3, divided by the global token count; one token at
    a time."""
    loss = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            logp = row[y] - torch.logsumexp(row, 0)
            ratio = torch.exp(logp - old[b, t].double())
            a = float(adv[b])
            term = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
            if cfg.beta > 0:
                d = ref[b, t].double() - logp
                term = term + cfg.beta * (torch.exp(d) - d - 1)
            loss = loss + term
    return loss / total_tokens


def fixed_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = IGNORE_INDEX  # the prompt
    labels[1, 5:] = IGNORE_INDEX  # a shorter completion
    labels[4] = IGNORE_INDEX  # a masked (truncated) completion
    # old log-probs off by up to +-0.6 from the current ones: ratios well outside [0.8, 1.28], clipped on both sides
    current = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (current + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2).float()
    ref = (current + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)).float()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7, 2.0, 0.0])[:B]
    return {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels, "advantages": adv,
            "num_tokens": torch.full((B,), T), "old_logps": old, "ref_logps": ref}, logits


class FixedLogits(torch.nn.Module):
    """A 'model' whose output is a leaf tensor of fixed logits: the gradient is taken with respect to them."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids):
        return self.logits[:input_ids.shape[0]]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_the_formulas_token_by_token(beta):
    cfg = GRPOConfig(beta=beta)
    batch, logits = fixed_batch()
    strategy = GRPOStrategy(cfg)
    model = FixedLogits(logits)
    loss, metrics = strategy.compute_loss(model, batch)
    loss.backward()
    leaf = logits.double().clone().requires_grad_(True)
    n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    expected = direct_loss(leaf, batch["labels"], batch["old_logps"], batch["ref_logps"], batch["advantages"], cfg,
                           n_tokens)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert torch.allclose(model.logits.grad.double(), leaf.grad, atol=1e-6)
    assert model.logits.grad[4].abs().sum() == 0  # the masked completion takes no part
    assert 0 < float(metrics["grpo/clip_fraction"]) < 1  # the fixture clips some tokens, not all
    assert (float(metrics["grpo/kl"]) > 0) == (beta > 0)


def test_without_old_logps_the_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    """One update per rollout: loss = -sum(A) over tokens / N in value; gradient = -A grad log p / N."""
    batch, logits = fixed_batch()
    del batch["old_logps"], batch["ref_logps"]
    model = FixedLogits(logits)
    loss, metrics = GRPOStrategy(GRPOConfig()).compute_loss(model, batch)
    loss.backward()
    mask = batch["labels"] != IGNORE_INDEX
    n = int(mask.sum())
    assert float(loss) == pytest.approx(float(-(batch["advantages"][:, None] * mask).sum() / n), abs=1e-6)
    leaf = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(leaf, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    (-(batch["advantages"][:, None] * logp * mask).sum() / n).backward()
    assert torch.allclose(model.logits.grad, leaf.grad, atol=1e-6)
    assert float(metrics["grpo/clip_fraction"]) == 0


def test_the_loss_does_not_depend_on_the_split_into_micro_batches():
    """Each micro-batch's share divides by the global batch's token count: the shares of any split add up to the
    loss and gradient of the whole."""
    batch, logits = fixed_batch()
    strategy = GRPOStrategy(GRPOConfig(beta=0.1))
    whole = FixedLogits(logits)
    loss, _ = strategy.compute_loss(whole, batch)
    loss.backward()
    totals = strategy.counts(batch)
    parts = FixedLogits(logits)
    total = 0.0
    for rows in ([0, 1], [2, 3, 4], [5]):
        part = {k: v[rows] for k, v in batch.items()}
        # each part's rows of the fixed logits
        share, _ = strategy.compute_loss(lambda ids, r=rows: parts.logits[r], part, totals)
        share.backward()
        total += float(share)
    # float32 rounding of a mean of O(1) per-token terms that mostly cancel (the loss is about 0.01): an absolute
    # tolerance, as the CPU's summation order differs between AVX2 and AVX-512 kernels
    assert total == pytest.approx(float(loss), abs=1e-7)
    assert torch.allclose(parts.logits.grad, whole.logits.grad, atol=1e-7)


def test_a_completion_row_trains_its_completion_and_stop_token_only():
    input_ids, labels = completion_rows([1, 5, 6], [7, 8, 2])
    assert input_ids == [1, 5, 6, 7, 8]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2]


def test_completion_seeds_differ_per_rollout_prompt_and_sample_and_repeat():
    seeds = {completion_seed(1234, r, i, j) for r in range(3) for i in range(4) for j in range(5)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)
    assert completion_seed(1234, 2, 3, 4) == completion_seed(1234, 2, 3, 4)


@pytest.mark.parametrize("key,value,fragment", [
    ("group_size", 1, "advantages compare"),
    ("temperature", 0, "sampled"),
    ("num_iterations", 0, "at least 1"),
    ("clip_low", 1.0, "[0, 1)"),
    ("rewards", {}, "name at least one reward"),
])
def test_bad_grpo_settings_name_the_key(key, value, fragment):
    from astrai_ds.config.base import FieldError

    with pytest.raises(FieldError) as e:
        GRPOConfig(**{key: value})
    assert key in str(e.value) and fragment in str(e.value)
