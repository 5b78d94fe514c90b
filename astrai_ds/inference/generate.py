"""Greedy decoding and sequence scoring on a `Transformer`.

No KV cache yet: every step recomputes the full forward over the (cropped) context, which is simple and
exactly matches training-time logits; a later change adds the cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from astrai_ds.model.transformer import Transformer


def _left_pad_batch(seqs: list[list[int]], device: torch.device, pad_id: int = 0):
    """Left-pad `seqs` into one batch.

    Returns input_ids (B, T), position_ids (B, T) counting from 0 at each sequence's first real token,
    and a bool attn_mask (B, 1, T, T) = causal AND key is real. Left padding keeps every sequence's last
    token in the last column, where the next-token logits are read.
    """
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for row, s in enumerate(seqs):
        input_ids[row, T - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[row, T - len(s):] = True
    input_ids, valid = input_ids.to(device), valid.to(device)
    position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T); pads sit at 0
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    mask = causal & valid[:, None, :]  # (B, T, T): query i may see real keys j <= i
    # A pad query would see no key at all; a fully masked softmax row is NaN on some SDPA backends, and
    # that NaN would then leak into real rows through 0 * NaN in the value product. Letting each pad
    # attend to itself keeps everything finite; real tokens never see pads, so their outputs are unchanged.
    mask |= torch.eye(T, dtype=torch.bool, device=device)
    return input_ids, position_ids, mask.unsqueeze(1)  # mask: (B, 1, T, T)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: Iterable[int]) -> list[list[int]]:
    """Greedy (argmax) continuation of each prompt, batched with left padding.

    Returns only the new tokens of each prompt; a prompt stops at its first stop id, which is not
    included, or after max_new_tokens. Contexts longer than model.cfg.max_seq_len keep their last
    max_seq_len tokens. The model is put in eval mode for the call and its mode restored afterwards.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token (e.g. a BOS id)")
    stop = set(stop_ids)
    max_len = model.cfg.max_seq_len
    device = _device(model)
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))

    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if not active:
                break
            # Only unfinished prompts are recomputed; each is cropped on its own, as it would be alone.
            input_ids, position_ids, mask = _left_pad_batch([seqs[i][-max_len:] for i in active], device)
            logits = model(input_ids, position_ids=position_ids, attn_mask=mask)  # (B, T, vocab)
            next_ids = logits[:, -1].argmax(dim=-1).tolist()  # (B,)
            still_active = []
            for i, token in zip(active, next_ids):
                if token in stop:
                    continue
                seqs[i].append(token)
                new[i].append(token)
                still_active.append(i)
            active = still_active
    finally:
        model.train(was_training)
    return new


@torch.no_grad()
def sequence_logprob(model: Transformer, prompt: list[int], completion: list[int]) -> float:
    """Sum over the completion tokens of log p(token | prompt and the completion before it).

    The whole sequence must fit in model.cfg.max_seq_len (cropping would change what is scored).
    """
    if not prompt:
        raise ValueError("sequence_logprob: the prompt needs at least one token (e.g. a BOS id)")
    if not completion:
        return 0.0
    ids = list(prompt) + list(completion)
    if len(ids) > model.cfg.max_seq_len:
        raise ValueError(f"sequence_logprob: prompt + completion is {len(ids)} tokens, more than "
                         f"max_seq_len={model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.tensor([ids], dtype=torch.long, device=_device(model))  # (1, T)
        logits = model(input_ids)[0, len(prompt) - 1:-1].float()  # (len(completion), vocab): predicts completion
    finally:
        model.train(was_training)
    targets = input_ids[0, len(prompt):]  # (len(completion),)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])  # (len(completion), 1)
    return float(logprobs.sum())
