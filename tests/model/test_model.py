"""The model's components and the whole Transformer on a tiny config (CPU, well under a second each)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from astrai_ds.model import (HF_LLAMA_NAMES, Attention, ModelConfig, RMSNorm, RotaryEmbedding, Transformer,
                             apply_rotary, from_hf_llama_name, hf_llama_name)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides))


def ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def causal_mask(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


# ---- components ---------------------------------------------------------------------------------

def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_relative_position_and_norm_preserving():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)

    def dot(pq: int, pk: int) -> torch.Tensor:
        cos_q, sin_q = rope(torch.tensor([pq]))
        cos_k, sin_k = rope(torch.tensor([pk]))
        rq, _ = apply_rotary(q, q, cos_q, sin_q)
        _, rk = apply_rotary(k, k, cos_k, sin_k)
        return (rq * rk).sum()

    # q.k after rotation depends only on the offset between the two positions.
    torch.testing.assert_close(dot(5, 2), dot(40, 37), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dot(0, 0), (q * k).sum(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(dot(5, 2), dot(5, 4))

    x = torch.randn(2, 4, 10, 16)
    cos, sin = rope(torch.arange(10))
    rx, _ = apply_rotary(x, x, cos, sin)
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))


def test_rope_uses_rotate_half_convention():
    # HF Llama pairs element i with element i + head_dim/2 (not 2i with 2i+1).
    rope = RotaryEmbedding(head_dim=4, max_seq_len=8, theta=10000.0)
    cos, sin = rope(torch.tensor([3]))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 4, 2).double() / 4)
    angles = torch.cat([3 * inv_freq, 3 * inv_freq]).float()
    torch.testing.assert_close(cos[0, 0], angles.cos())
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    rx, _ = apply_rotary(x, x, cos, sin)
    c, s = angles.cos(), angles.sin()
    expected = torch.tensor([1 * c[0] - 3 * s[0], 2 * c[1] - 4 * s[1], 3 * c[2] + 1 * s[2], 4 * c[3] + 2 * s[3]])
    torch.testing.assert_close(rx.flatten(), expected)


def test_rope_shapes_and_batched_positions():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    cos, sin = rope(torch.arange(10))
    assert cos.shape == sin.shape == (1, 10, 16) and cos.dtype == torch.float32
    cos_b, _ = rope(torch.stack([torch.arange(10), torch.arange(10) + 3]))
    assert cos_b.shape == (2, 10, 16)
    torch.testing.assert_close(cos_b[1, :7], cos[0, 3:])


def test_gqa_equals_mha_reference_by_hand():
    cfg = tiny()
    torch.manual_seed(0)
    attn = Attention(cfg)
    B, T, H, KV, D = 2, 10, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    x = torch.randn(B, T, cfg.dim)
    cos, sin = RotaryEmbedding(D, cfg.max_seq_len)(torch.arange(T))

    q = (x @ attn.wq.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, T, KV, D).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, T, KV, D).transpose(1, 2)
    q, k = apply_rotary(q, k, cos, sin)
    # Query head h uses kv head h // (H / KV).
    k = torch.stack([k[:, h // (H // KV)] for h in range(H)], dim=1)
    v = torch.stack([v[:, h // (H // KV)] for h in range(H)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~causal_mask(T), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
    expected = y @ attn.wo.weight.T

    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-4)


def test_repeat_interleave_matches_sdpa_enable_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    ours = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    try:
        native = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except TypeError:
        pytest.skip("this torch has no enable_gqa")
    torch.testing.assert_close(ours, native)


# ---- the whole model ----------------------------------------------------------------------------

def test_output_shape_and_dtype():
    m = model()
    logits = m(ids(2, 16))
    assert logits.shape == (2, 16, 256) and logits.dtype == torch.float32


def test_causal_future_tokens_do_not_change_earlier_logits():
    m = model()
    x = ids(1, 16)
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_explicit_causal_mask_equals_default():
    m = model()
    x = ids(2, 12)
    torch.testing.assert_close(m(x, attn_mask=causal_mask(12)), m(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, attn_mask=causal_mask(12)[None, None].expand(2, 1, 12, 12)), m(x),
                               atol=1e-5, rtol=1e-5)


def test_block_diagonal_mask_equals_separate_sequences():
    # The packing contract: two documents in one row with a block-diagonal causal mask and restarted
    # positions give the same logits as each document alone.
    m = model()
    a, b = ids(1, 5, seed=2), ids(1, 7, seed=3)
    packed = torch.cat([a, b], dim=1)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[:5, :5] = causal_mask(5)
    mask[5:, 5:] = causal_mask(7)
    pos = torch.cat([torch.arange(5), torch.arange(7)])
    out = m(packed, position_ids=pos, attn_mask=mask)
    torch.testing.assert_close(out[:, :5], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], m(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_on_off(qk_norm):
    m = model(qk_norm=qk_norm)
    names = set(m.state_dict())
    assert ("layers.0.attention.q_norm.weight" in names) == qk_norm
    assert ("layers.1.attention.k_norm.weight" in names) == qk_norm
    logits = m(ids(2, 8))
    assert logits.shape == (2, 8, 256) and torch.isfinite(logits).all()


def test_tied_embeddings_share_storage_and_count_once():
    untied, tied = model(), model(tie_embeddings=True)
    emb, out = tied.embed.tok_embeddings.weight, tied.head.output.weight
    assert emb is out and emb.data_ptr() == out.data_ptr()
    assert tied.num_params() == untied.num_params() - 256 * 64
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True) - 256 * 64
    # Both still do a dim x vocab matmul in the head.
    assert tied.flops_per_token(64) == untied.flops_per_token(64)
    logits = tied(ids(1, 4))
    logits.sum().backward()
    assert emb.grad is not None


def test_num_params_and_flops_per_token_formula():
    cfg = tiny()
    m = model()
    D, H, KV, hd, F_, V, L = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.ffn_dim, 256, cfg.n_layers
    per_layer_matmul = D * H * hd * 2 + D * KV * hd * 2 + 3 * D * F_
    per_layer = per_layer_matmul + 2 * D
    assert m.num_params() == V * D + L * per_layer + D + D * V
    assert m.num_params(exclude_embeddings=True) == L * per_layer + D + D * V
    assert m.flops_per_token(64) == 6 * (L * per_layer_matmul + D * V) + 12 * L * D * 64


EXPECTED_NAMES = {"embed.tok_embeddings.weight", "head.norm.weight", "head.output.weight"} | {
    f"layers.{i}.{name}.weight" for i in range(2) for name in (
        "attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "attention.q_norm", "attention.k_norm", "ffn_norm", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3")}


def test_state_dict_names_and_hf_map():
    m = model(qk_norm=True)
    keys = list(m.state_dict())
    assert set(keys) == EXPECTED_NAMES  # and so no RoPE tables
    hf = [hf_llama_name(k) for k in keys]
    assert len(set(hf)) == len(hf)
    assert all(from_hf_llama_name(h) == k for h, k in zip(hf, keys))
    assert hf_llama_name("layers.1.feed_forward.w1.weight") == "model.layers.1.mlp.gate_proj.weight"
    assert hf_llama_name("layers.0.feed_forward.w3.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_llama_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_llama_name("layers.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_llama_name("head.output.weight") == "lm_head.weight"
    # Every template in the documented table is used by a qk_norm model or by one with q/k/v biases.
    biased = list(model(attention_bias=True).state_dict())
    assert {re.sub(r"\.\d+\.", ".{i}.", k) for k in keys + biased} == set(HF_LLAMA_NAMES)
    assert hf_llama_name("layers.1.attention.wk.bias") == "model.layers.1.self_attn.k_proj.bias"
    with pytest.raises(KeyError):
        hf_llama_name("layers.0.attention.bias")


def test_init_is_deterministic_and_scaled():
    a, b = model(seed=3), model(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embed.tok_embeddings.weight, model(seed=4).embed.tok_embeddings.weight)
    cfg = tiny()
    big = Transformer(ModelConfig(**{**cfg.to_dict(), "dim": 256, "n_heads": 4, "ffn_dim": 512, "n_layers": 8}))
    assert big.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert big.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(big.layers[0].ffn_norm.weight, torch.ones(256))


def test_activation_checkpointing_same_loss_and_grads():
    x = ids(2, 16)

    def loss_and_grads(checkpointing: bool):
        m = model()
        m.activation_checkpointing = checkpointing
        m.train()
        logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_bf16_runs_and_rope_tables_stay_float32():
    m = model().bfloat16()
    logits = m(ids(2, 8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    cos, sin = m.rope.tables(torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32
    assert m.rope(torch.arange(4))[0].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert not list(m.buffers())


def test_positions_beyond_max_seq_len_raise():
    m = model()
    with pytest.raises(RuntimeError, match="max_seq_len"):
        m(ids(1, 65))
    with pytest.raises(RuntimeError, match="max_seq_len"):
        m(ids(1, 4), position_ids=torch.tensor([0, 1, 2, 64]))
    m(ids(1, 64))  # exactly max_seq_len is fine


def test_auto_vocab_size_is_rejected():
    with pytest.raises(ValueError, match="resolved"):
        Transformer(ModelConfig(vocab_size="auto", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64))
