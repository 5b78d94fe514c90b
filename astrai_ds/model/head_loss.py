"""The output projection and the labels' log-probabilities in chunks of tokens, forward and backward, without the
whole (tokens, vocab) logits in memory (the idea of Liger's fused linear cross-entropy and torchtune's chunked
cross-entropy).

Training needs only each label's log-probability, log softmax(x W^T)[label], and its gradient. Computed the plain
way, the (B, T, V) logits, their float32 copy and the log-softmax are each the largest tensors of a step at a
49,152-token vocabulary. Here each chunk of at most `chunk_tokens(V)` tokens computes its logits, keeps only the
labels' log-probabilities and the log-sum-exp, and drops them; the backward pass recomputes one chunk's logits at a
time for its gradients (a batch that is one chunk keeps its logits instead: nothing is computed twice). Values are
those of `losses.token_logps(x @ W^T, labels)`: the same matmul in the same dtype, upcast to float32 before the
softmax; the gradient of W is summed over chunks in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astrai_ds.model.init import NormalLinear
from astrai_ds.model.losses import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 23  # logits elements per chunk: 32 MiB in float32 (170 tokens at V 49,152; 4,096 at 2,048)


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _ChunkedLogps(torch.autograd.Function):
    """x (N, dim), weight (V, dim), labels (N,) -> float32 (N,): log softmax(x W^T)[label], 0 where ignored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        N = x.shape[0]
        out = torch.zeros(N, dtype=torch.float32, device=x.device)
        lse = torch.zeros(N, dtype=torch.float32, device=x.device)
        keep = labels != IGNORE_INDEX
        safe = labels.masked_fill(~keep, 0)
        for s in range(0, N, chunk):
            logits = F.linear(x[s:s + chunk], weight).float()  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[s:s + chunk, None])[:, 0]
            out[s:s + chunk] = torch.where(keep[s:s + chunk], target - lse[s:s + chunk], 0.0)
        # One chunk is all of it: keep its logits (at most CHUNK_ELEMENTS floats) rather than compute them again
        kept = logits if 0 < N <= chunk else lse.new_empty(0)
        ctx.save_for_backward(x, weight, safe, keep, lse, kept)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, safe, keep, lse, kept = ctx.saved_tensors
        chunk = ctx.chunk
        g = torch.where(keep, grad_out.float(), 0.0)  # (N,): d loss / d logp of each label
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1] and x.shape[0] > chunk:  # summed over chunks in float32
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, x.shape[0], chunk):
            xc, gc = x[s:s + chunk], g[s:s + chunk]
            logits = kept if kept.numel() else F.linear(xc, weight).float()  # recomputed: (c, V)
            # d logp[label] / d logits = onehot(label) - softmax(logits)
            dlogits = torch.exp(logits - lse[s:s + chunk, None]).mul_(-gc[:, None])
            dlogits.scatter_add_(1, safe[s:s + chunk, None], gc[:, None])
            dlogits = dlogits.to(x.dtype)  # as the plain path, whose float32 copy hands its gradient back in x's dtype
            if grad_x is not None:
                grad_x[s:s + chunk] = dlogits @ weight
            if grad_w is not None:
                grad_w += (dlogits.t() @ xc).float()
            elif ctx.needs_input_grad[1]:  # one chunk: no sum, and no float32 copy of the weight's size
                grad_w = dlogits.t() @ xc
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_token_logps(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk: int | None = None) -> torch.Tensor:
    """x (..., dim), weight (V, dim), labels (...) -> float32 (...): each label's log-probability under
    softmax(x W^T), 0 where the label is IGNORE_INDEX; `chunk` tokens at a time (default `chunk_tokens(V)`)."""
    shape = labels.shape
    out = _ChunkedLogps.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1),
                              chunk or chunk_tokens(weight.shape[0]))
    return out.view(shape)


class OutputLinear(NormalLinear):
    """The model's output projection: logits as an `nn.Linear`, or, given labels, their log-probabilities through
    `chunked_token_logps` (inside this module's own forward, so that ZeRO-3 gathers its weight around it as around
    any other forward)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is not None:
            raise ValueError("the chunked head loss has no bias term; the output projection has none")
        return chunked_token_logps(x, self.weight, labels)
