"""Training strategies: each turns a micro-batch into its share of the global batch's loss. The engine owns
backward, step, accumulation and clipping; a strategy only counts and computes.

A loss is a sum over what it counts (trained tokens, preference pairs), divided once by the count of the
whole global batch: every micro-batch of every data-parallel rank. So a strategy has two calls:

- `counts(batch) -> {name: 0-dim float64 tensor}`: what this micro-batch holds ("tokens": trained labels,
  "pairs", ...; always "inputs": the non-padding tokens that go through the policy, for tokens/s). The
  trainer sums them over the step's micro-batches and all-reduces them over the ranks: the `totals`.
- `compute_loss(model, batch, totals) -> (loss, metrics)`: this micro-batch's contribution, e.g. its summed
  token loss / totals["tokens"]. Summed over micro-batches and ranks, the contributions give the global
  batch's loss, whatever the micro-batch size, accumulation and world size. Without `totals` the batch's own
  counts are used: the loss of that batch alone.

metrics maps a name to a detached 0-dim float32 tensor on the batch's device (no host sync per micro-step),
each a contribution in the same sense, so the trainer sums them; "loss" is always there.

With `fused` set (the train config's `fused_loss`, the default), the policy's forward is given the labels and
returns their log-probabilities, computed in chunks without the whole (B, T, V) logits (`model/head_loss.py`);
the losses are the same within float32 rounding. Pipeline stages compute the loss from logits on their last
stage, so they run unfused.

Build a strategy with `STRATEGIES[stage.type].from_config(cfg, reference=...)`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from astrai_ds.config.train import DPOConfig
from astrai_ds.model.losses import IGNORE_INDEX, sequence_logps, token_counts, token_logps, token_loss_sum
from astrai_ds.training.losses import LENGTH_NORMALISED, dpo_loss

# A frozen reference model: input_ids (N, T) -> logits (N, T, V), e.g. a DeepSpeed inference engine.
Reference = Callable[[torch.Tensor], torch.Tensor]


def _count(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def policy_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, fused: bool, **kwargs) -> torch.Tensor:
    """Each label's float32 log-probability under the policy (B, T), 0 where ignored: fused, the model computes
    them from its head in chunks (`Transformer.forward(labels=...)`); else from the whole logits."""
    if fused:
        return model(input_ids, labels=labels, **kwargs)
    return token_logps(model(input_ids, **kwargs), labels)


class TokenStrategy:
    """Shared by PT and SFT: the loss is the mean next-token loss over the global batch's trained tokens."""

    name = ""
    reference_forward = False  # no second model runs on the batch
    fused = False  # the labels' log-probabilities from the head in chunks (set by the trainer)

    @classmethod
    def from_config(cls, cfg=None, reference: Reference | None = None):
        return cls()

    def policy_shape(self, batch: dict) -> tuple[int, int]:
        """(rows, T) of the policy's forward: what it computes on, padding included."""
        return tuple(batch["input_ids"].shape)

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"tokens": _count((batch["labels"] != IGNORE_INDEX).sum()), "inputs": _count(self._inputs(batch))}

    def _inputs(self, batch: dict):
        return batch["input_ids"].numel()

    def _forward_kwargs(self, batch: dict) -> dict:
        return {}

    def forward(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], **self._forward_kwargs(batch))  # (B, T, V)

    def compute_loss(self, model, batch: dict, totals: dict | None = None) -> tuple[torch.Tensor, dict]:
        totals = totals or self.counts(batch)
        if not self.fused:
            return self.loss(self.forward(model, batch), batch["labels"], totals)
        logps = policy_logps(model, batch["input_ids"], batch["labels"], True, **self._forward_kwargs(batch))
        loss = -logps.sum() / totals["tokens"].clamp(min=1).float()
        return loss, {"loss": loss.detach()}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, totals: dict) -> tuple[torch.Tensor, dict]:
        """The loss from the model's outputs: logits (B, T, V) and labels (B, T) -> (this micro-batch's share of
        the global batch's loss, metrics). The pipeline engine calls it on its last stage."""
        loss = token_loss_sum(logits, labels) / totals["tokens"].clamp(min=1).float()
        return loss, {"loss": loss.detach()}

    def pipeline_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs for the model as pipeline stages pass them (model/pipeline.py): input_ids (B, T), position_ids
        (B, T) and doc_ids, (B, 1) for plain causal attention."""
        input_ids = batch["input_ids"]
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T).contiguous()
        return input_ids, positions, torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)


class PretrainStrategy(TokenStrategy):
    """Causal language modelling on fixed windows of the token stream (no padding)."""

    name = "pt"


class SFTStrategy(TokenStrategy):
    """Supervised fine-tuning on (possibly packed) conversations; only the assistant tokens are trained.

    batch: input_ids, labels (IGNORE_INDEX on prompt tokens, segment boundaries and padding), and optionally
    position_ids (restarting per packed segment) and doc_ids (segment index, -1 on padding). With doc_ids,
    attention is block-diagonal causal, so packed segments never see each other; without, plain causal.
    """

    name = "sft"

    def _inputs(self, batch: dict):
        doc_ids = batch.get("doc_ids")
        return batch["input_ids"].numel() if doc_ids is None else (doc_ids >= 0).sum()

    def _forward_kwargs(self, batch: dict) -> dict:
        attn_mask = None
        if batch.get("doc_ids") is not None:
            from astrai_ds.model.masks import block_causal_mask

            attn_mask = block_causal_mask(batch["doc_ids"])  # (B, 1, T, T) bool
        return {"position_ids": batch.get("position_ids"), "attn_mask": attn_mask}

    def pipeline_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, positions, doc_ids = super().pipeline_inputs(batch)
        if batch.get("position_ids") is not None:
            positions = batch["position_ids"]
        if batch.get("doc_ids") is not None:
            doc_ids = batch["doc_ids"]  # (B, T): attention stays inside each packed segment
        return input_ids, positions, doc_ids


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


def _real_inputs(labels: torch.Tensor) -> torch.Tensor:
    """Non-padding inputs of right-padded DPO rows (B, T): a response ends each sequence, so a row's real
    inputs end at its last trained label."""
    trained = labels != IGNORE_INDEX  # (B, T)
    end = trained.shape[1] - trained.flip(-1).int().argmax(-1)  # (B,) one past the last trained label
    return torch.where(trained.any(-1), end, 0).sum()


class DPOStrategy:
    """Preference optimisation on (chosen, rejected) pairs: DPO and its variants (`losses.DPO_LOSSES`).

    Chosen and rejected go through the policy as one concatenated (2B, T) batch, split with chunk(2).
    Reference log-probs come from the batch ("ref_chosen_logps", "ref_rejected_logps", precomputed with
    `reference_logps`) when present, else from `reference` (one no-grad forward on the same batch).
    Reference-free types ("simpo") need neither, and get length-normalised (average) log-probs.
    The preference loss is the mean over the global batch's pairs; the optional NLL term (`sft_weight`) the
    mean token loss over all its chosen responses' tokens. metrics (means over the pairs): "loss",
    "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/reward_accuracy" (share of pairs with chosen reward >
    rejected reward), "dpo/reward_margin" (chosen minus rejected reward), "dpo/logps_chosen",
    "dpo/logps_rejected" (the policy's summed log-probs of the responses, whatever the loss type), and with
    sft_weight "dpo/sft_nll".
    """

    name = "dpo"
    fused = False

    def __init__(self, cfg: DPOConfig | None = None, reference: Reference | None = None):
        self.cfg = cfg or DPOConfig()
        self.reference = reference

    @classmethod
    def from_config(cls, cfg: DPOConfig, reference: Reference | None = None) -> "DPOStrategy":
        return cls(cfg, reference)

    @property
    def needs_reference(self) -> bool:
        return self.cfg.needs_reference

    @property
    def reference_forward(self) -> bool:
        """Whether a reference model runs on every batch (not when precomputed or reference-free)."""
        return self.needs_reference and self.reference is not None

    @staticmethod
    @torch.no_grad()
    def reference_logps(reference_model: Reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs under the reference: float32 (B,) chosen, (B,) rejected, no graph.

        One forward on the concatenated pair batch; use it in a precompute pass to fill the batch's
        "ref_chosen_logps" / "ref_rejected_logps" (keyed by batch["index"]).
        """
        input_ids, labels = concatenated_pair(batch)
        return sequence_logps(reference_model(input_ids), labels).chunk(2)

    def policy_shape(self, batch: dict) -> tuple[int, int]:
        B, T = batch["chosen_input_ids"].shape[0], max(batch["chosen_input_ids"].shape[1],
                                                       batch["rejected_input_ids"].shape[1])
        return 2 * B, T

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs = _real_inputs(batch["chosen_labels"]) + _real_inputs(batch["rejected_labels"])
        return {"pairs": _count(batch["chosen_labels"].shape[0]),
                "chosen_tokens": _count((batch["chosen_labels"] != IGNORE_INDEX).sum()), "inputs": _count(inputs)}

    def compute_loss(self, model, batch: dict, totals: dict | None = None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        totals = totals or self.counts(batch)
        pairs = totals["pairs"].clamp(min=1).float()
        input_ids, labels = concatenated_pair(batch)  # (2B, T)
        logps = policy_logps(model, input_ids, labels, self.fused).sum(-1)  # (2B,) summed
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,) each
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self._reference_logps(batch)
            ref_chosen, ref_rejected = ref_chosen.to(logps.device), ref_rejected.to(logps.device)
        if cfg.loss_type in LENGTH_NORMALISED:
            # clamp: a pair whose response was truncated away entirely contributes 0, not 0/0
            n_chosen, n_rejected = token_counts(labels).clamp(min=1).chunk(2)
            policy_chosen, policy_rejected = chosen_logps / n_chosen, rejected_logps / n_rejected
        else:
            policy_chosen, policy_rejected = chosen_logps, rejected_logps
        pref_sum, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing,
            gamma=cfg.simpo_gamma, reduction="sum")
        loss = pref_sum / pairs
        metrics = {}
        if cfg.sft_weight > 0:
            # token-weighted over every chosen response of the global batch, like the SFT loss
            nll = -chosen_logps.sum() / totals["chosen_tokens"].clamp(min=1).float()
            loss = loss + cfg.sft_weight * nll
            metrics["dpo/sft_nll"] = nll.detach()
        metrics |= {"loss": loss.detach(),
                    "dpo/rewards_chosen": chosen_rewards.sum() / pairs,
                    "dpo/rewards_rejected": rejected_rewards.sum() / pairs,
                    "dpo/reward_accuracy": (chosen_rewards > rejected_rewards).float().sum() / pairs,
                    "dpo/reward_margin": (chosen_rewards - rejected_rewards).sum() / pairs,
                    "dpo/logps_chosen": chosen_logps.detach().sum() / pairs,
                    "dpo/logps_rejected": rejected_logps.detach().sum() / pairs}
        return loss, metrics

    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.reference is None:
            raise ValueError(f"DPO loss_type {self.cfg.loss_type!r} needs reference log-probs: give the strategy "
                             f"a reference model, or precompute them into the batch (ref_chosen_logps, "
                             f"ref_rejected_logps); only simpo needs neither")
        return self.reference_logps(self.reference, batch)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                    clip_high: float, ref_logps: torch.Tensor | None = None, beta: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss, before any masking or averaging: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
    with r = exp(logps - old_logps), plus beta times the k3 estimate of KL(policy || reference),
    exp(ref - logps) - (ref - logps) - 1. logps, old_logps, ref_logps: (B, T); advantages: (B,).
    -> (loss (B, T), kl (B, T) (zeros without a reference), clipped (B, T) bool: where the clip took the gradient)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    was_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return loss, kl, was_clipped


class GRPOStrategy:
    """Group relative policy optimisation on rollout batches (training/rollout.py makes them).

    batch: input_ids (B, T) (prompt, completion, right padding), labels (B, T) (the completion's tokens, its stop
    token included; IGNORE_INDEX elsewhere, and on the whole of a truncated completion under mask_truncated),
    advantages (B,), num_tokens (B,) (the row's real tokens), and optionally old_logps (B, T) (the policy's log-probs
    at rollout time, when each rollout trains several steps) and ref_logps (B, T) (the frozen reference's, for the
    KL term). Without old_logps the ratio is taken to the detached current log-probs: 1 in value, the policy
    gradient in its gradient. The loss is the sum over every completion token of the global batch divided by their
    number (token-level aggregation: the same for any split into micro-batches and ranks). metrics, means over the
    global batch's completion tokens: "loss", "grpo/kl", "grpo/clip_fraction"."""

    name = "grpo"
    reference_forward = False  # the reference's log-probs come with the rollout
    fused = False

    def __init__(self, cfg=None, reference: Reference | None = None):
        from astrai_ds.config.train import GRPOConfig

        self.cfg = cfg or GRPOConfig()
        self.reference = reference  # the rollout runs it once per rollout batch (ref_logps), for the KL term

    @classmethod
    def from_config(cls, cfg=None, reference: Reference | None = None) -> "GRPOStrategy":
        return cls(cfg, reference)

    def policy_shape(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["input_ids"].shape)

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"tokens": _count((batch["labels"] != IGNORE_INDEX).sum()),
                "completions": _count(batch["labels"].shape[0]), "inputs": _count(batch["num_tokens"].sum())}

    def compute_loss(self, model, batch: dict, totals: dict | None = None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        totals = totals or self.counts(batch)
        labels = batch["labels"]
        mask = (labels != IGNORE_INDEX).float()
        logps = policy_logps(model, batch["input_ids"], labels, self.fused)  # (B, T) float32
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ref = batch.get("ref_logps") if cfg.beta > 0 else None
        per_token, kl, clipped = grpo_token_loss(logps, old, batch["advantages"].float(), cfg.clip_low, cfg.clip_high,
                                                 ref, cfg.beta)
        tokens = totals["tokens"].clamp(min=1).float()
        loss = (per_token * mask).sum() / tokens
        return loss, {"loss": loss.detach(), "grpo/kl": (kl.detach() * mask).sum() / tokens,
                      "grpo/clip_fraction": (clipped.float() * mask).sum() / tokens}


STRATEGIES = {"pt": PretrainStrategy, "sft": SFTStrategy, "dpo": DPOStrategy, "grpo": GRPOStrategy}
