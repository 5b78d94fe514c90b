"""Greedy generation and sequence scoring on a tiny random model."""

import pytest
import torch

from astrai_ds.inference.generate import greedy_generate, sequence_logprob
from astrai_ds.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
    # A larger init makes a random model's argmax depend strongly on the context, so a masking or
    # position bug changes the tokens instead of hiding behind a near-constant prediction.
    cfg.init_std = 0.2
    return Transformer(cfg)


PROMPTS = [[5, 17, 42, 7, 99, 3, 250], [12], [200, 1, 9]]


def test_left_padded_batch_equals_one_by_one(model):
    batched = greedy_generate(model, PROMPTS, max_new_tokens=6, stop_ids=[])
    single = [greedy_generate(model, [p], max_new_tokens=6, stop_ids=[])[0] for p in PROMPTS]
    assert batched == single
    assert all(len(out) == 6 for out in batched)
    assert len({tuple(out) for out in batched}) > 1  # the prompts really lead to different outputs


def test_matches_manual_argmax_loop(model):
    seq = list(PROMPTS[0])
    for _ in range(4):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert greedy_generate(model, [PROMPTS[0]], max_new_tokens=4, stop_ids=set())[0] == seq[len(PROMPTS[0]):]


def test_stops_at_stop_ids_per_prompt(model):
    free = greedy_generate(model, PROMPTS, max_new_tokens=6, stop_ids=[])
    stop = free[0][2]  # prompt 0 stops before its third new token
    out = greedy_generate(model, PROMPTS, max_new_tokens=6, stop_ids={stop})
    assert out[0] == free[0][:free[0].index(stop)]
    for got, full in zip(out[1:], free[1:]):
        assert got == (full[:full.index(stop)] if stop in full else full)
    assert greedy_generate(model, PROMPTS, max_new_tokens=0, stop_ids=[]) == [[], [], []]


def test_long_context_is_cropped_from_the_left(model):
    long_prompt = [(7 * i) % 256 for i in range(70)]  # longer than max_seq_len=64: would raise uncropped
    out = greedy_generate(model, [long_prompt], max_new_tokens=3, stop_ids=[])[0]
    assert out == greedy_generate(model, [long_prompt[-64:]], max_new_tokens=3, stop_ids=[])[0]
    assert len(out) == 3


def test_restores_training_mode(model):
    model.train()
    greedy_generate(model, [[1, 2]], max_new_tokens=1, stop_ids=[])
    sequence_logprob(model, [1, 2], [3])
    assert model.training
    model.eval()


def test_sequence_logprob_equals_manual(model):
    prompt, completion = [5, 17, 42], [7, 99, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).float()[0]
    logp = torch.log_softmax(logits, dim=-1)
    manual = sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(completion))
    assert sequence_logprob(model, prompt, completion) == pytest.approx(manual, abs=1e-5)
    assert sequence_logprob(model, prompt, []) == 0.0
    with pytest.raises(ValueError):
        sequence_logprob(model, [], [1])


def test_left_pad_batch_positions_and_mask():
    from astrai_ds.inference.generate import _left_pad_batch

    input_ids, position_ids, mask = _left_pad_batch([[4, 5, 6], [7]], torch.device("cpu"))
    assert input_ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    # Each prompt's first real token is position 0, as it would be alone (RoPE itself is relative, but
    # the max_seq_len check and a future KV cache see absolute positions).
    assert position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # Real query 2 sees only itself; pad queries see only themselves (never an empty row).
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
