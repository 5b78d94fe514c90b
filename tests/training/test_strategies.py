"""Strategies on a tiny model: SFT masking and packing parity, DPO with a live or a precomputed reference."""

import math
import sys
import types

import pytest
import torch

from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.losses import IGNORE_INDEX, sequence_logps, token_counts
from astrai_ds.training.losses import dpo_loss
from astrai_ds.config.train import DPOConfig
from astrai_ds.training.strategies import STRATEGIES, DPOStrategy, PretrainStrategy, SFTStrategy

V = 64


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
    return Transformer(cfg).float()


def local_block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: causal and within the same segment (padding is segment -1)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (causal & same).unsqueeze(1)  # (B, 1, T, T)


@pytest.fixture(autouse=True)
def masks_module(monkeypatch):
    """Use astrai_ds.model.masks when it exists (and check it against the local mask); else stand in for it."""
    try:
        from astrai_ds.model.masks import block_causal_mask
    except ImportError:
        fake = types.ModuleType("astrai_ds.model.masks")
        fake.block_causal_mask = local_block_causal_mask
        monkeypatch.setitem(sys.modules, "astrai_ds.model.masks", fake)
        return
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    assert torch.equal(block_causal_mask(doc_ids).expand(2, 1, 6, 6), local_block_causal_mask(doc_ids))


# ---- SFT ---------------------------------------------------------------------------------------------

def sft_batch(rows: list[list[tuple[list[int], list[int]]]], T: int) -> dict:
    """One row per inner list: its samples packed back to back, then right-padded to T."""
    batch = {k: torch.full((len(rows), T), fill, dtype=torch.long)
             for k, fill in (("input_ids", 0), ("labels", IGNORE_INDEX), ("position_ids", 0), ("doc_ids", -1))}
    for r, segments in enumerate(rows):
        start = 0
        for d, (tokens, labels) in enumerate(segments):
            n = len(tokens)
            batch["input_ids"][r, start:start + n] = torch.tensor(tokens)
            labels = labels[:-1] + [IGNORE_INDEX]  # the last target would be the next segment: not trained
            batch["labels"][r, start:start + n] = torch.tensor(labels)
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            batch["doc_ids"][r, start:start + n] = d
            start += n
    return batch


def loss_and_grads(strategy, model, batch) -> tuple[torch.Tensor, dict, dict]:
    model.zero_grad(set_to_none=True)
    loss, metrics = strategy.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def sample(n: int, n_prompt: int, seed: int, targets: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(input tokens, labels) of one conversation: the targets (default: the next token) are trained only on
    the response, i.e. where the target token itself belongs to the response (index >= n_prompt - 1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (n + 1,), generator=g).tolist()
    targets = targets if targets is not None else tokens[1:]
    return tokens[:n], [targets[t] if t + 1 >= n_prompt else IGNORE_INDEX for t in range(n)]


def test_sft_trains_only_response_targets():
    model, strategy = tiny_model(), SFTStrategy()
    raw = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(8)).tolist()  # targets before masking
    batch = sft_batch([[sample(12, 5, 3, raw)]], 12)
    base_loss, metrics, base_grads = loss_and_grads(strategy, model, batch)
    trained = batch["labels"][0] != IGNORE_INDEX
    assert strategy.counts(batch)["tokens"].item() == trained.sum().item() == 12 - 5  # targets 5..11, less the last
    assert strategy.counts(batch)["inputs"].item() == 12  # no padding
    with torch.no_grad():
        logp = model(batch["input_ids"]).float().log_softmax(-1)[0]  # (T, V)
    expected = -sum(logp[t, batch["labels"][0, t]] for t in range(12) if trained[t]) / trained.sum()
    torch.testing.assert_close(base_loss, expected)

    prompt_changed = list(raw)
    prompt_changed[2] = (raw[2] + 1) % V  # a prompt position: its target is masked
    loss, _, grads = loss_and_grads(strategy, model, sft_batch([[sample(12, 5, 3, prompt_changed)]], 12))
    torch.testing.assert_close(loss, base_loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], base_grads[name], rtol=0, atol=0)

    response_changed = list(raw)
    response_changed[6] = (raw[6] + 1) % V  # a response position: its target is trained
    loss, _, _ = loss_and_grads(strategy, model, sft_batch([[sample(12, 5, 3, response_changed)]], 12))
    assert abs(loss.item() - base_loss.item()) > 1e-4


@pytest.mark.parametrize("unpacked_doc_ids", [True, False])
def test_sft_packed_equals_unpacked_loss_and_grads(unpacked_doc_ids):
    model, strategy = tiny_model(), SFTStrategy()
    a, b, c = sample(7, 3, seed=0), sample(6, 2, seed=1), sample(9, 4, seed=2)
    packed = sft_batch([[a, b], [c]], T=16)  # row 0 holds two segments, both rows end in padding
    assert packed["doc_ids"][0].tolist() == [0] * 7 + [1] * 6 + [-1] * 3
    assert packed["position_ids"][0, 7].item() == 0
    assert packed["labels"][0, 6].item() == IGNORE_INDEX  # the segment boundary
    unpacked = sft_batch([[a], [b], [c]], T=9)
    if not unpacked_doc_ids:  # right padding under plain causal attention is just as invisible
        unpacked = {k: unpacked[k] for k in ("input_ids", "labels")}
    p_loss, p_metrics, p_grads = loss_and_grads(strategy, model, packed)
    u_loss, u_metrics, u_grads = loss_and_grads(strategy, model, unpacked)
    assert (strategy.counts(packed)["tokens"].item() == strategy.counts(unpacked)["tokens"].item()
            == (7 - 3) + (6 - 2) + (9 - 4))
    assert strategy.counts(packed)["inputs"].item() == 7 + 6 + 9  # non-padding inputs (doc_ids >= 0)
    torch.testing.assert_close(p_loss, u_loss)
    for name in p_grads:
        torch.testing.assert_close(p_grads[name], u_grads[name], msg=lambda m: f"{name}: {m}")


def test_sft_without_packing_is_plain_causal():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (2, 10), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    pt_loss, _ = PretrainStrategy().compute_loss(model, {"input_ids": ids, "labels": labels})
    sft_loss, _ = SFTStrategy().compute_loss(model, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(sft_loss, pt_loss)


# ---- DPO ---------------------------------------------------------------------------------------------

def dpo_batch(B: int = 2, T: int = 10, T_rejected: int | None = None, seed: int = 0) -> dict:
    """Prompt of 4 tokens shared by both sides; chosen fills the row, rejected is 3 tokens shorter (padding)."""
    g = torch.Generator().manual_seed(seed)
    T_rejected = T_rejected or T
    batch = {"index": torch.arange(B)}
    prompt = torch.randint(1, V, (B, 4), generator=g)
    for side, length, width in (("chosen", T, T), ("rejected", T - 3, T_rejected)):
        ids = torch.cat([prompt, torch.randint(1, V, (B, width - 4), generator=g)], 1)
        labels = torch.roll(ids, -1, 1)
        labels[:, :3] = IGNORE_INDEX  # targets inside the prompt
        labels[:, length - 1:] = IGNORE_INDEX  # the last token and the padding
        ids[:, length:] = 0
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def record_calls(model) -> list[tuple[int, ...]]:
    """The input_ids shapes of every forward of `model` from now on."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    return calls


def test_dpo_live_reference_equals_precomputed_and_reference_gets_no_grads():
    policy, reference = tiny_model(0), tiny_model(1)
    batch = dpo_batch()
    policy_calls, reference_calls = record_calls(policy), record_calls(reference)
    live = DPOStrategy(DPOConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.1), reference=reference)
    live_loss, live_metrics, live_grads = loss_and_grads(live, policy, batch)
    assert policy_calls == [(4, 10)] and reference_calls == [(4, 10)]  # one forward each on the (2B, T) batch
    assert all(p.grad is None for p in reference.parameters())

    ref_c, ref_r = DPOStrategy.reference_logps(reference, batch)
    assert ref_c.shape == (2,) and not ref_c.requires_grad
    pre = DPOStrategy(DPOConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.1))
    pre_loss, pre_metrics, pre_grads = loss_and_grads(pre, policy, {**batch, "ref_chosen_logps": ref_c,
                                                                     "ref_rejected_logps": ref_r})
    torch.testing.assert_close(pre_loss, live_loss)
    assert set(pre_metrics) == set(live_metrics) == {
        "loss", "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/reward_accuracy", "dpo/reward_margin",
        "dpo/logps_chosen", "dpo/logps_rejected"}
    for name, value in live_metrics.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name
        torch.testing.assert_close(pre_metrics[name], value)
    for name in live_grads:
        torch.testing.assert_close(pre_grads[name], live_grads[name])
    assert any(g.abs().max() > 0 for g in live_grads.values())

    # the concatenated forward agrees with separate forwards of each side
    with torch.no_grad():
        pc = sequence_logps(policy(batch["chosen_input_ids"]), batch["chosen_labels"])
        pr = sequence_logps(policy(batch["rejected_input_ids"]), batch["rejected_labels"])
        rc = sequence_logps(reference(batch["chosen_input_ids"]), batch["chosen_labels"])
        rr = sequence_logps(reference(batch["rejected_input_ids"]), batch["rejected_labels"])
    expected, chosen, rejected = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.1)
    torch.testing.assert_close(live_loss, expected)
    torch.testing.assert_close(live_metrics["dpo/reward_margin"], (chosen - rejected).mean())
    torch.testing.assert_close(live_metrics["dpo/reward_accuracy"], (chosen > rejected).float().mean())
    torch.testing.assert_close(live_metrics["dpo/logps_chosen"], pc.mean())


def test_dpo_against_itself_is_log_two():
    policy, reference = tiny_model(0), tiny_model(0)
    loss, metrics = DPOStrategy(reference=reference).compute_loss(policy, dpo_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["dpo/reward_margin"].item() == pytest.approx(0.0, abs=1e-6)


def test_dpo_pads_the_shorter_side():
    policy, reference = tiny_model(0), tiny_model(1)
    batch = dpo_batch(T=10, T_rejected=7)
    padded = dict(batch, rejected_input_ids=torch.nn.functional.pad(batch["rejected_input_ids"], (0, 3)),
                  rejected_labels=torch.nn.functional.pad(batch["rejected_labels"], (0, 3), value=IGNORE_INDEX))
    strategy = DPOStrategy(reference=reference)
    torch.testing.assert_close(strategy.compute_loss(policy, batch)[0], strategy.compute_loss(policy, padded)[0])


def test_simpo_needs_no_reference_and_uses_average_logps():
    policy = tiny_model(0)
    batch = dpo_batch()
    reference = tiny_model(1)
    reference_calls = record_calls(reference)
    strategy = DPOStrategy(DPOConfig(beta=2.0, loss_type="simpo", gamma=1.0), reference=reference)
    loss, metrics = strategy.compute_loss(policy, batch)
    assert reference_calls == []
    with torch.no_grad():
        avg_c = (sequence_logps(policy(batch["chosen_input_ids"]), batch["chosen_labels"])
                 / token_counts(batch["chosen_labels"]))
        avg_r = (sequence_logps(policy(batch["rejected_input_ids"]), batch["rejected_labels"])
                 / token_counts(batch["rejected_labels"]))
    expected = sum(-math.log(1 / (1 + math.exp(-(2.0 * (c - r) - 1.0)))) for c, r in
                   zip(avg_c.tolist(), avg_r.tolist())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(metrics["dpo/rewards_chosen"], 2.0 * avg_c.mean())


def test_dpo_without_any_reference_raises():
    with pytest.raises(ValueError, match="reference"):
        DPOStrategy().compute_loss(tiny_model(), dpo_batch())


def test_from_config_and_registry():
    assert set(STRATEGIES) == {"pt", "sft", "dpo", "grpo"}
    cfg = DPOConfig(beta=0.3, loss_type="ipo")
    ref = object()
    s = STRATEGIES["dpo"].from_config(cfg, reference=ref)
    assert (s.cfg, s.reference, s.needs_reference) == (cfg, ref, True)
    assert DPOStrategy().cfg.loss_type == "sigmoid"
    simpo = DPOStrategy.from_config(DPOConfig(beta=2.0, loss_type="simpo", gamma=1.0))
    assert (simpo.cfg.simpo_gamma, simpo.needs_reference, simpo.reference_forward) == (1.0, False, False)
    assert DPOConfig(loss_type="simpo").simpo_gamma == 0.5
    assert isinstance(STRATEGIES["sft"].from_config(cfg, reference=ref), SFTStrategy)
    assert isinstance(STRATEGIES["pt"].from_config(cfg), PretrainStrategy)


def test_dpo_sft_weight_adds_chosen_token_nll():
    """RPO: loss = DPO loss + sft_weight x the mean token NLL over all chosen responses' tokens."""

    import torch

    from astrai_ds.model.losses import sequence_logps, token_counts
    from astrai_ds.training.strategies import DPOStrategy, concatenated_pair

    torch.manual_seed(0)
    vocab, B, T = 11, 3, 6
    table = torch.randn(vocab, vocab)

    def model(ids):  # a fixed bigram "model": logits depend on the current token only
        return table[ids]

    labels = torch.randint(0, vocab, (B, T))
    labels[:, :2] = -100
    batch = {"chosen_input_ids": torch.randint(0, vocab, (B, T)), "chosen_labels": labels,
             "rejected_input_ids": torch.randint(0, vocab, (B, T)), "rejected_labels": labels.flip(1),
             "ref_chosen_logps": torch.zeros(B), "ref_rejected_logps": torch.zeros(B)}
    plain, _ = DPOStrategy.from_config(DPOConfig(beta=0.2)).compute_loss(model, batch)
    rpo, metrics = DPOStrategy.from_config(DPOConfig(beta=0.2, sft_weight=0.5)).compute_loss(model, batch)
    ids, all_labels = concatenated_pair(batch)
    chosen = sequence_logps(model(ids), all_labels).chunk(2)[0]
    nll = -chosen.sum() / token_counts(labels).sum()
    assert torch.allclose(rpo, plain + 0.5 * nll)
    assert torch.allclose(metrics["dpo/sft_nll"], nll)


def test_dpo_counts_pairs_chosen_tokens_and_real_inputs_of_both_sides():
    """tokens/s counts what the policy reads without padding: both sides of each pair, up to each row's last
    trained label (in collate_dpo's batches the response ends every sequence)."""
    batch = dpo_batch(B=2, T=10)  # chosen rows: labels on positions 3..8; rejected rows: 3..5, padded to 10
    counts = DPOStrategy().counts(batch)
    assert counts["pairs"].item() == 2 and counts["chosen_tokens"].item() == 2 * 6
    assert counts["inputs"].item() == 2 * 9 + 2 * 6
    assert DPOStrategy().policy_shape(batch) == (4, 10)
