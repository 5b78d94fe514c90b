"""The chunked head loss (model/head_loss.py) against the whole logits: values and gradients, the model's forward
with labels, and every strategy's loss and gradients fused and unfused (PT, SFT packed with per-document masks,
DPO, GRPO), in float32 within rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.head_loss import OutputLinear, chunk_tokens, chunked_token_logps
from astrai_ds.model.losses import IGNORE_INDEX, token_logps


def _inputs(N: int = 37, dim: int = 24, V: int = 301, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, dim, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, dim, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX
    return x, w, labels


def _grads(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, seed: int = 1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))  # any upstream gradient
    return torch.autograd.grad((out * g).sum(), (x, w))


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_chunked_logps_and_gradients_equal_the_whole_logits(chunk):
    x, w, labels = _inputs()
    want = token_logps(F.linear(x, w), labels)
    got = chunked_token_logps(x, w, labels, chunk)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got[labels == IGNORE_INDEX] == 0).all()
    for a, b in zip(_grads(got, x, w), _grads(want, x, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_stays_within_bf16_rounding_of_the_whole_logits():
    x, w, labels = _inputs(dtype=torch.bfloat16)
    want = token_logps(F.linear(x, w), labels)
    got = chunked_token_logps(x, w, labels, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the same bf16 matmul, softmax in float32
    for a, b in zip(_grads(got, x, w), _grads(want, x, w)):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens(2048) == 4096 and chunk_tokens(49152) == 170 and chunk_tokens(10**9) == 1


def tiny(tied: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                      tie_embeddings=tied)
    return Transformer(cfg).float()


@pytest.mark.parametrize("tied", [True, False])
def test_the_models_forward_with_labels_equals_its_logits(tied):
    model = tiny(tied)
    assert isinstance(model.head.output, OutputLinear)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = torch.randint(0, 97, (3, 20), generator=g)
    labels[:, :6] = IGNORE_INDEX
    fused = model(ids, labels=labels)
    plain = token_logps(model(ids), labels)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    grads = []
    for out in (fused, plain):
        model.zero_grad(set_to_none=True)
        out.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_lora_on_the_head_goes_through_the_whole_logits():
    """An adapter on the output projection changes its class: the forward with labels still includes it."""
    from astrai_ds.model.lora import apply_lora

    model = tiny(tied=False)
    apply_lora(model, 4, 8.0, 0.0, ["output"])
    with torch.no_grad():
        model.head.output.lora_B.normal_()  # the adapter changes the logits
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.roll(-1, 1)
    torch.testing.assert_close(model(ids, labels=labels), token_logps(model(ids), labels), rtol=0, atol=1e-6)


# ---- every strategy, fused and unfused -----------------------------------------------------------------

def _sft_batch(g):
    ids = torch.randint(1, 97, (2, 16), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :4] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 7 + [1] * 7 + [-1] * 2, [0] * 16])
    labels[doc_ids < 0] = IGNORE_INDEX
    labels[0, 6] = IGNORE_INDEX  # a segment's last target would be the next segment
    position_ids = torch.cat([torch.arange(7), torch.arange(7), torch.zeros(2, dtype=torch.long)])[None]
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids,
            "position_ids": torch.cat([position_ids, torch.arange(16)[None]])}


def _dpo_batch(g):
    def side(n):
        ids = torch.randint(1, 97, (2, n), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, :5] = IGNORE_INDEX
        labels[:, -1] = IGNORE_INDEX
        return ids, labels
    (ci, cl), (ri, rl) = side(14), side(11)
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl,
            "ref_chosen_logps": torch.tensor([-30.0, -28.0]), "ref_rejected_logps": torch.tensor([-29.0, -31.0])}


def _grpo_batch(g):
    ids = torch.randint(1, 97, (4, 15), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :6] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8]),
            "num_tokens": torch.full((4,), 15), "old_logps": torch.full((4, 15), -4.5),
            "ref_logps": torch.full((4, 15), -4.4)}


@pytest.mark.parametrize("stage", ["pt", "sft", "dpo", "grpo"])
def test_every_strategy_gives_the_same_loss_and_gradients_fused(stage):
    from astrai_ds.config.train import DPOConfig, GRPOConfig
    from astrai_ds.training.strategies import STRATEGIES

    g = torch.Generator().manual_seed(5)
    batch = {"pt": lambda: {"input_ids": (ids := torch.randint(0, 97, (2, 16), generator=g)),
                            "labels": ids.roll(-1, 1)},
             "sft": lambda: _sft_batch(g), "dpo": lambda: _dpo_batch(g), "grpo": lambda: _grpo_batch(g)}[stage]()
    cfg = {"dpo": DPOConfig(sft_weight=0.5), "grpo": GRPOConfig(beta=0.04)}.get(stage)
    model = tiny(tied=True)
    results = []
    for fused in (False, True):
        strategy = STRATEGIES[stage].from_config(cfg)
        strategy.fused = fused
        model.zero_grad(set_to_none=True)
        loss, metrics = strategy.compute_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_metrics, plain_grads), (fused, fused_metrics, fused_grads) = results
    assert plain.item() != 0
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert fused_metrics.keys() == plain_metrics.keys()
    for name, value in plain_metrics.items():
        torch.testing.assert_close(fused_metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("N, V", [(300, 97), (8, 97)])  # several chunks; one chunk, whose logits are kept
def test_what_the_chunked_head_keeps_for_backward_is_what_plan_counts(N, V, monkeypatch):
    """Saved-tensor hooks count what the chunked head keeps beyond its input and weight: per token its label, mask
    and log-sum-exp, and a one-chunk batch's fp32 logits; `memory.head_bytes` counts that plus one chunk's
    working tensors, and stays far below the whole logits' count when the batch spans many chunks."""
    import astrai_ds.model.head_loss as head_loss
    from astrai_ds.training.memory import head_bytes

    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 16 * V)  # 16 tokens a chunk
    x, w, labels = _inputs(N=N, V=V)
    kept = []

    def pack(t):
        if t.data_ptr() not in (x.data_ptr(), w.data_ptr()):
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logps(x, w, labels)
    one_chunk = N <= 16
    assert sum(kept) == N * (8 + 1 + 4) + (N * V * 4 if one_chunk else 0)
    counted = head_bytes(N, V, bytes_per_value=4)
    assert counted == N * 13 + min(N, 16) * V * (4 + 4 + 4) >= sum(kept)
    if not one_chunk:
        assert counted < head_bytes(N, V, bytes_per_value=4, fused=False) / 4
