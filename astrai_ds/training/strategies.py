"""Training strategies: each turns a batch into a loss. The engine owns backward, step, accumulation
and clipping; a strategy only computes `compute_loss(model, batch) -> (loss, metrics)`.

metrics maps a name to a detached 0-dim float32 tensor on the batch's device (no host sync per
micro-step); "loss" is always there. The trainer averages them over micro-steps and ranks.
Build a strategy with `STRATEGIES[stage.type].from_config(stage, reference=...)`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from astrai_ds.training.losses import (IGNORE_INDEX, LENGTH_NORMALISED, REFERENCE_FREE, SIMPO_GAMMA,
                                       check_dpo_loss_type, dpo_loss, sequence_logps, token_counts,
                                       token_cross_entropy)

# A frozen reference model: input_ids (N, T) -> logits (N, T, V), e.g. a DeepSpeed inference engine.
Reference = Callable[[torch.Tensor], torch.Tensor]


class PretrainStrategy:
    """Causal language modelling on fixed windows of the token stream."""

    name = "pt"

    @classmethod
    def from_config(cls, stage_cfg=None, reference: Reference | None = None) -> "PretrainStrategy":
        return cls()

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"])  # (B, T, V)
        loss = token_cross_entropy(logits, batch["labels"])
        return loss, {"loss": loss.detach()}


class SFTStrategy:
    """Supervised fine-tuning on (possibly packed) conversations; only the assistant tokens are trained.

    batch: input_ids, labels (IGNORE_INDEX on prompt tokens, segment boundaries and padding), and optionally
    position_ids (restarting per packed segment) and doc_ids (segment index, -1 on padding). With doc_ids,
    attention is block-diagonal causal, so packed segments never see each other; without, plain causal.
    The loss is the mean over the trained tokens of the micro-batch. metrics: "loss", "tokens" (the number
    of trained tokens in the micro-batch, as a float32 tensor).
    """

    name = "sft"

    @classmethod
    def from_config(cls, stage_cfg=None, reference: Reference | None = None) -> "SFTStrategy":
        return cls()

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        attn_mask = None
        if batch.get("doc_ids") is not None:
            from astrai_ds.model.masks import block_causal_mask

            attn_mask = block_causal_mask(batch["doc_ids"])  # (B, 1, T, T) bool
        logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=attn_mask)  # (B, T, V)
        loss = token_cross_entropy(logits, batch["labels"])
        tokens = (batch["labels"] != IGNORE_INDEX).sum().float()
        return loss, {"loss": loss.detach(), "tokens": tokens}


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def concatenated_pair(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows: input_ids (2B, T), labels (2B, T); the shorter side is right-padded."""
    chosen_ids, rejected_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    T = max(chosen_ids.shape[1], rejected_ids.shape[1])
    # Right padding behind causal attention changes nothing before it; pad labels are ignored.
    input_ids = torch.cat([_pad_right(chosen_ids, T, 0), _pad_right(rejected_ids, T, 0)])  # (2B, T)
    labels = torch.cat([_pad_right(batch["chosen_labels"], T, IGNORE_INDEX),
                        _pad_right(batch["rejected_labels"], T, IGNORE_INDEX)])  # (2B, T)
    return input_ids, labels


class DPOStrategy:
    """Preference optimisation on (chosen, rejected) pairs: DPO and its variants (`losses.DPO_LOSSES`).

    Chosen and rejected go through the policy as one concatenated (2B, T) batch, split with chunk(2).
    Reference log-probs come from the batch ("ref_chosen_logps", "ref_rejected_logps", precomputed with
    `reference_logps`) when present, else from `reference` (one no-grad forward on the same batch).
    Reference-free types ("simpo") need neither, and get length-normalised (average) log-probs.
    metrics (detached 0-dim float32 tensors, batch means): "loss", "dpo/rewards_chosen",
    "dpo/rewards_rejected", "dpo/reward_accuracy" (share of pairs with chosen reward > rejected reward),
    "dpo/reward_margin" (chosen minus rejected reward), "dpo/logps_chosen", "dpo/logps_rejected" (the
    policy's summed log-probs of the responses, whatever the loss type).
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: Reference | None = None, *, gamma: float = SIMPO_GAMMA, sft_weight: float = 0.0):
        check_dpo_loss_type(loss_type, label_smoothing)
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        self.beta, self.loss_type, self.label_smoothing, self.gamma = beta, loss_type, label_smoothing, gamma
        self.reference = reference
        # RPO (Pang et al. 2024): add sft_weight x the chosen responses' mean token NLL, so that pushing the
        # rejected answers down does not also drag the chosen ones (and the model's fluency) down with them.
        self.sft_weight = sft_weight

    @classmethod
    def from_config(cls, stage_cfg, reference: Reference | None = None) -> "DPOStrategy":
        """Reads beta, loss_type, label_smoothing and, for SimPO, gamma or gamma_beta_ratio (gamma / beta)."""
        beta = getattr(stage_cfg, "beta", 0.1)
        ratio = getattr(stage_cfg, "gamma_beta_ratio", None)
        gamma = beta * ratio if ratio is not None else getattr(stage_cfg, "gamma", SIMPO_GAMMA)
        return cls(beta, getattr(stage_cfg, "loss_type", "sigmoid"), getattr(stage_cfg, "label_smoothing", 0.0),
                   reference, gamma=gamma, sft_weight=getattr(stage_cfg, "sft_weight", 0.0))

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    @staticmethod
    @torch.no_grad()
    def reference_logps(reference_model: Reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs under the reference: float32 (B,) chosen, (B,) rejected, no graph.

        One forward on the concatenated pair batch; use it in a precompute pass to fill the batch's
        "ref_chosen_logps" / "ref_rejected_logps" (keyed by batch["index"]).
        """
        input_ids, labels = concatenated_pair(batch)
        return sequence_logps(reference_model(input_ids), labels).chunk(2)

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        input_ids, labels = concatenated_pair(batch)  # (2B, T)
        logps = sequence_logps(model(input_ids), labels)  # (2B,) summed
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,) each
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self._reference_logps(batch)
            ref_chosen, ref_rejected = ref_chosen.to(logps.device), ref_rejected.to(logps.device)
        if self.loss_type in LENGTH_NORMALISED:
            # clamp: a pair whose response was truncated away entirely contributes 0, not 0/0
            n_chosen, n_rejected = token_counts(labels).clamp(min=1).chunk(2)
            policy_chosen, policy_rejected = chosen_logps / n_chosen, rejected_logps / n_rejected
        else:
            policy_chosen, policy_rejected = chosen_logps, rejected_logps
        loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          self.beta, self.loss_type, self.label_smoothing,
                                                          gamma=self.gamma)
        metrics = {}
        if self.sft_weight > 0:
            n_chosen = token_counts(labels).clamp(min=1).chunk(2)[0]
            nll = -(chosen_logps / n_chosen).mean()
            loss = loss + self.sft_weight * nll
            metrics["dpo/sft_nll"] = nll.detach()
        metrics |= {"loss": loss.detach(),
                   "dpo/rewards_chosen": chosen_rewards.mean(),
                   "dpo/rewards_rejected": rejected_rewards.mean(),
                   "dpo/reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                   "dpo/reward_margin": (chosen_rewards - rejected_rewards).mean(),
                   "dpo/logps_chosen": chosen_logps.detach().mean(),
                   "dpo/logps_rejected": rejected_logps.detach().mean()}
        return loss, metrics

    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.reference is None:
            raise ValueError(f"DPO loss_type {self.loss_type!r} needs reference log-probs: give the strategy "
                             f"a reference model, or precompute them into the batch (ref_chosen_logps, "
                             f"ref_rejected_logps); only {sorted(REFERENCE_FREE)} need neither")
        return self.reference_logps(self.reference, batch)


STRATEGIES = {"pt": PretrainStrategy, "sft": SFTStrategy, "dpo": DPOStrategy}
