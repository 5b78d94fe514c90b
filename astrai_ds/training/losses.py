"""Loss functions as plain tensor functions (strategies and evaluation share them).

Preference losses live in the `DPO_LOSSES` registry; `dpo_loss` is the one entry point that strategies call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that takes no part in the loss (padding, masked prompt tokens)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not IGNORE_INDEX.

    logits: (B, T, V) in any dtype (upcast to float32: a bf16 log-softmax over a large vocabulary loses bits);
    labels: (B, T), already shifted so that labels[:, t] is the target of position t.
    A batch without a single trained label (an SFT window that is all prompt) gives 0 with zero gradients,
    where F.cross_entropy's own mean would give 0/0 = NaN and poison the step.
    """
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def token_counts(labels: torch.Tensor) -> torch.Tensor:
    """labels: (N, T) -> (N,) int64, the number of labels per row that are not IGNORE_INDEX."""
    return (labels != IGNORE_INDEX).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labels: (N, T, V), (N, T) -> float32 (N,).

    labels are already shifted (labels[:, t] is the target of position t); IGNORE_INDEX labels contribute 0.
    The log-softmax runs in float32 whatever the logits' dtype. For a length-normalised average (SimPO),
    divide by `token_counts(labels)`.
    """
    mask = labels != IGNORE_INDEX  # (N, T)
    safe = labels.masked_fill(~mask, 0)  # gather needs a valid index even where the label is ignored
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    per_token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return torch.where(mask, per_token, 0.0).sum(-1)  # (N,)


# ---- preference losses ---------------------------------------------------------------------------
# Each takes the per-pair logits `h` (N,) and returns the per-pair loss (N,). For reference-based losses
# h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected) in summed log-probs; for the
# reference-free SimPO, h = policy_chosen - policy_rejected in average (length-normalised) log-probs.
# All share one signature so `dpo_loss` can call any of them; each ignores the knobs it has no use for.
DPOLossFn = Callable[[torch.Tensor, float, float, float], torch.Tensor]


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO (Mitchell, 2023): the preference label is assumed flipped with probability eps.
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta h), with optional label smoothing."""
    return _smoothed_sigmoid(beta * h, label_smoothing)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> torch.Tensor:
    """IPO (Azar et al., 2023): (h - 1 / (2 beta))^2, a squared loss that does not saturate."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> torch.Tensor:
    """SLiC (Zhao et al., 2023): relu(1 - beta h)."""
    return torch.relu(1 - beta * h)


def simpo_loss(h: torch.Tensor, beta: float, label_smoothing: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al., 2024): -log sigmoid(beta h - gamma), h from average log-probs, no reference."""
    return _smoothed_sigmoid(beta * h - gamma, label_smoothing)


DPO_LOSSES: dict[str, DPOLossFn] = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss,
                                    "simpo": simpo_loss}
REFERENCE_FREE = frozenset({"simpo"})  # loss types that ignore the reference log-probs
LENGTH_NORMALISED = frozenset({"simpo"})  # loss types that expect average, not summed, log-probs
LABEL_SMOOTHING = frozenset({"sigmoid", "simpo"})  # loss types that use label_smoothing
# Default SimPO target margin gamma, as TRL's CPOConfig.simpo_gamma; SimPO's own code sets
# gamma_beta_ratio = gamma / beta instead. SimPO wants a much larger beta than DPO's 0.1 (around 2).
SIMPO_GAMMA = 0.5


def check_dpo_loss_type(loss_type: str, label_smoothing: float = 0.0) -> None:
    """Raise ValueError for an unknown loss_type, or label smoothing on a type that would ignore it."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING:
        raise ValueError(f"label_smoothing={label_smoothing} has no effect on loss_type {loss_type!r}; "
                         f"it applies to {sorted(LABEL_SMOOTHING)} only, so set it to 0")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             gamma: float = SIMPO_GAMMA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss over a batch of pairs -> (loss, chosen_rewards, rejected_rewards).

    Inputs are (N,) per-pair sequence log-probs: summed over the response tokens for the reference-based
    types ("sigmoid", "ipo", "hinge"); averaged over them for "simpo" (see `LENGTH_NORMALISED`), which
    ignores the reference and accepts ref_* = None. loss: the mean over the N pairs (a 0-dim float32 tensor).
    rewards: (N,) detached, beta * (policy - reference) log-probs, or beta * policy for reference-free types.
    gamma: SimPO's target margin (in reward units, the same for every beta); SimPO's own code writes it
    as gamma_beta_ratio = gamma / beta, so gamma = beta * gamma_beta_ratio. Unused by the other types.
    """
    check_dpo_loss_type(loss_type, label_smoothing)
    policy_chosen_logps, policy_rejected_logps = policy_chosen_logps.float(), policy_rejected_logps.float()
    h = policy_chosen_logps - policy_rejected_logps  # (N,)
    if loss_type in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs; only "
                             f"{sorted(REFERENCE_FREE)} run without a reference model")
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.float(), ref_rejected_logps.float()
        h = h - (ref_chosen_logps - ref_rejected_logps)
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = DPO_LOSSES[loss_type](h, beta, label_smoothing, gamma).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()
