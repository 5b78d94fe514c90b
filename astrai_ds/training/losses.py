"""Preference losses as plain tensor functions, behind the `DPO_LOSSES` registry; `dpo_loss` is the one entry
point that the DPO strategy calls. Token losses and log-probs live beside the model (`model/losses.py`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from astrai_ds.config.train import SIMPO_GAMMA

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


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             gamma: float = SIMPO_GAMMA, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss over a batch of pairs -> (loss, chosen_rewards, rejected_rewards).

    Inputs are (N,) per-pair sequence log-probs: summed over the response tokens for the reference-based
    types ("sigmoid", "ipo", "hinge"); averaged over them for "simpo" (see `LENGTH_NORMALISED`), which
    ignores the reference and accepts ref_* = None. loss: the mean (reduction "mean") or the sum ("sum") over
    the N pairs, a 0-dim float32 tensor; the sum is for a batch that is only part of the pairs averaged over.
    rewards: (N,) detached, beta * (policy - reference) log-probs, or beta * policy for reference-free types.
    gamma: SimPO's target margin (in reward units, the same for every beta); SimPO's own code writes it
    as gamma_beta_ratio = gamma / beta, so gamma = beta * gamma_beta_ratio. Unused by the other types.
    """
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
    per_pair = DPO_LOSSES[loss_type](h, beta, label_smoothing, gamma)
    loss = per_pair.sum() if reduction == "sum" else per_pair.mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()
