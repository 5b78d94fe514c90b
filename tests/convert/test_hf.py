"""The model folder is also Hugging Face's: `transformers` loads an export as LlamaForCausalLM (Qwen3ForCausalLM
with QK-norm) and gives our logits, our greedy tokens, our tokenization and our chat rendering; a folder that
`transformers` saved loads here; a folder we cannot run is one clear message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from astrai_ds.data.chat import ChatError, normalize_pair, normalize_record, render_chat
from astrai_ds.data.tokenizer import Tokenizer, train_tokenizer
from astrai_ds.errors import UserError
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.hf import from_hf_config, to_hf_config
from astrai_ds.model.io import MODEL_FILES, load_model_folder, load_weights, read_model_config, save_model_folder

transformers = pytest.importorskip("transformers")

# The three layouts an export can take: untied Llama, tied Llama with non-default RoPE base and epsilon, Qwen3.
VARIANTS = {
    "llama": dict(tie_embeddings=False),
    "llama_tied": dict(tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6),
    "qwen3": dict(qk_norm=True, tie_embeddings=True),
}
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "请用一句话介绍长城。"},
     {"role": "assistant", "content": "长城是中国古代修建的防御工程，全长两万多公里。"},
     {"role": "user", "content": "And in English, please: how long is it?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "12 + 30 = ?"},
     {"role": "assistant", "content": "42"},
     {"role": "user", "content": "谢谢！Thanks, 再见。"}],
]


def _hf_dtype(dtype: torch.dtype) -> dict:
    # transformers 5 takes `dtype`; 4.x called it `torch_dtype`
    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def _hf_ids(encoded) -> list[int]:
    # apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list in 4.x
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.fixture(scope="module")
def tokenizer(workspace) -> Tokenizer:
    return Tokenizer.load(workspace / "tokenizer")


def _model(tokenizer: Tokenizer, **over) -> Transformer:
    torch.manual_seed(0)
    # a vocabulary padded past the tokenizer's, as "auto" pads it; init_std 0.1 makes the argmax decisive
    return Transformer(ModelConfig(vocab_size=tokenizer.vocab_size + 64, dim=64, n_layers=2, n_heads=4,
                                   n_kv_heads=2, ffn_dim=176, max_seq_len=256, init_std=0.1, **over))


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tokenizer, tmp_path_factory):
    """(our model, its folder, the model transformers loaded from that folder)."""
    model = _model(tokenizer, **VARIANTS[request.param]).eval()
    folder = save_model_folder(model, tokenizer, tmp_path_factory.mktemp(request.param))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                 **_hf_dtype(torch.float32))
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, folder, hf.eval()


def test_the_folder_holds_hugging_face_files(exported):
    model, folder, hf = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if model.cfg.qk_norm else "LlamaForCausalLM")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and f.metadata()["format"] == "pt"
        torch.testing.assert_close(f.get_tensor("lm_head.weight"), model.head.output.weight, rtol=0, atol=0)
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    generation = json.loads((folder / "generation_config.json").read_text())
    tok = Tokenizer.load(folder)
    assert generation["eos_token_id"] == [tok.eos_id, tok.im_end_id]


def test_config_round_trips(exported, tokenizer):
    model, folder, _ = exported
    assert read_model_config(folder) == model.cfg
    assert from_hf_config(to_hf_config(model.cfg, tokenizer), "config.json") == model.cfg
    # and transformers re-saving its own reading of config.json changes nothing we read
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert from_hf_config(cfg.to_dict(), "re-saved config.json") == model.cfg


def test_transformers_gives_our_logits(exported, tokenizer):
    model, folder, hf = exported
    ids = torch.randint(0, tokenizer.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    reloaded, _ = load_model_folder(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), ours, rtol=0, atol=0)


def test_transformers_greedy_generate_gives_our_tokens(exported, tokenizer):
    from astrai_ds.inference.engine import LLMEngine
    from astrai_ds.inference.sampling import SamplingParams

    model, folder, hf = exported
    engine = LLMEngine(model, tokenizer)
    stop = {tokenizer.eos_id, tokenizer.im_end_id}
    prompts = [render_chat(tokenizer, m, add_generation_prompt=True)[0] for m in MESSAGES[:2]]
    prompts.append([tokenizer.bos_id] + tokenizer.encode("The quick brown fox"))
    for prompt in prompts:
        ours = engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20)).token_ids
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=20)
        theirs = out[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(theirs) if t in stop), len(theirs))  # ours leaves the stop id out
        assert ours == theirs[:cut], (prompt, ours, theirs)


def test_a_model_transformers_saved_loads_with_its_logits(tokenizer, tmp_path):
    """Tied weights saved by transformers have no lm_head.weight; our tokenizer files sit beside them."""
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.json")
    model, tok = load_model_folder(tmp_path)
    assert model.cfg.tie_embeddings and model.cfg.rope_theta == 10000.0 and model.cfg.norm_eps == 1e-5
    ids = torch.randint(0, tokenizer.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert tok.hash == tokenizer.hash
    sharded = tmp_path / "sharded"  # big models come as model-0000x-of-0000y.safetensors and an index
    hf.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copyfile(tokenizer.path, sharded / "tokenizer.json")
    assert not (sharded / "model.safetensors").exists()
    again, _ = load_model_folder(sharded)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_an_old_astrai_folder_still_loads(tokenizer, tmp_path):
    """Exports made before the HF schema: config.json is a ModelConfig and the weights carry our names, a tied
    matrix under one of its two names."""
    from safetensors.torch import save_model

    model = _model(tokenizer, tie_embeddings=True)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.json")
    loaded, _ = load_model_folder(tmp_path)
    assert loaded.cfg == model.cfg
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_load_weights_reads_an_export_into_a_model(tokenizer, tmp_path):
    """What stage.init_from does: the same shape, the weights of the folder."""
    source = _model(tokenizer, qk_norm=True)
    save_model_folder(source, tokenizer, tmp_path)
    torch.manual_seed(123)
    target = Transformer(source.cfg)
    load_weights(target, tmp_path)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- tokenizer and chat template


def test_transformers_tokenizes_and_decodes_like_ours(exported, tokenizer):
    _, folder, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert len(hf_tok) == tokenizer.vocab_size
    for text in ["The quick brown fox jumps over the lazy dog.", "长城是中国古代的防御工程。", "混合 mixed text, 123 + 45!",
                 "spaces  and\ttabs\nnew lines\r\n", "Hello , world . ( x )", "emoji 😀 and é"]:
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text


def _corpus_conversations(workspace):
    """(messages, add_generation_prompt) for every usable SFT and DPO record of the built-in corpus."""
    for name in ("sft.jsonl", "dpo.jsonl"):
        for line in (workspace / "corpus" / name).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if name == "dpo.jsonl":
                    prompt, chosen, _ = normalize_pair(record)
                    yield prompt, True
                    yield prompt + [{"role": "assistant", "content": chosen}], False
                else:
                    yield normalize_record(record), False
            except (ChatError, ValueError):  # the corpus holds deliberately broken records
                continue


def test_the_chat_template_renders_our_tokens(exported, tokenizer, workspace):
    _, folder, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    cases = [(m, True) for m in MESSAGES] + [(m + [{"role": "assistant", "content": "好的。OK."}], False)
                                            for m in MESSAGES] + list(_corpus_conversations(workspace))
    assert len(cases) > 1000
    for messages, generation in cases:
        ours = render_chat(tokenizer, messages, add_generation_prompt=generation)[0]
        theirs = _hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True))
        assert theirs == ours, messages
    text = hf_tok.apply_chat_template(MESSAGES[0], add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_where_the_chat_template_cannot_match(tmp_path):
    """Known differences, pinned so that they stay known: transformers encodes the rendered string once, ours
    encodes header and content apart. (1) Content that starts with two or more whitespace characters: the
    header's "\\n" joins them in one pre-token, so a merge such as "\\n\\n" can cross the boundary. (2) Content
    holding a special token's text: ours keeps it plain text, transformers makes it the special token."""
    corpus = tmp_path / "blank_lines.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"para {i}\n\n\nline"}) + "\n" for i in range(300)))
    train_tokenizer([corpus], 300, tmp_path / "tok", progress=False)
    tokenizer = Tokenizer.load(tmp_path / "tok")
    assert tokenizer.token_to_id("ĊĊ") is not None  # the byte-level form of "\n\n"
    model = Transformer(ModelConfig(vocab_size=320, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    folder = save_model_folder(model, tokenizer, tmp_path / "model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)

    def same(content: str) -> bool:
        messages = [{"role": "user", "content": content}]
        ours = render_chat(tokenizer, messages, add_generation_prompt=True)[0]
        return _hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)) == ours

    assert same("para\n\nline") and same("\npara") and same(" para")
    assert not same("\n\npara")
    assert not same("para <|im_end|> line")


# ---------------------------------------------------------------- folders we cannot run


def test_a_folder_of_another_architecture_is_one_clear_message(tokenizer, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                    "n_embd": 64}))
    shutil.copyfile(tokenizer.path, folder / "tokenizer.json")
    with pytest.raises(UserError, match=r"gpt2.*GPT2LMHeadModel.*llama") as e:
        load_model_folder(folder)
    assert str(folder) in str(e.value)


def test_llama_features_we_do_not_run_are_named(tokenizer, tmp_path):
    folder = save_model_folder(_model(tokenizer), tokenizer, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for change, message in (
            ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 32.0}}, "RoPE scaling 'yarn'"),
            ({"attention_bias": True}, "attention_bias True"),
            ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window 4096"),
            ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window True"),
            ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message) as e:
            load_model_folder(folder)
        assert str(folder / "config.json") in str(e.value)


# The architectures a folder from elsewhere may have, each with what sets it apart from plain Llama: Llama 3's RoPE
# scaling and a head_dim of its own, Mistral without a sliding window, Qwen2's q/k/v biases, Qwen3's QK-norm with a
# head_dim other than hidden / heads.
FOREIGN = {
    "llama3": ("LlamaConfig", dict(head_dim=32, rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, use_sliding_window=False)),
}


@pytest.mark.parametrize("arch", list(FOREIGN))
def test_a_folder_of_each_architecture_transformers_saved_runs_with_its_logits(arch, tokenizer, tmp_path):
    """Random weights (biases and norms included) in a folder `transformers` saved: our logits equal its (fp32,
    1e-4), greedy decoding gives its tokens, and our export of the model loads in `transformers` as the same
    architecture with the same logits."""
    config_class, extra = FOREIGN[arch]
    rope = extra.get("rope_scaling")
    cfg = getattr(transformers, config_class)(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        **{k: v for k, v in extra.items() if k != "rope_scaling"})
    if rope is not None:  # transformers 5 reads it as rope_parameters, 4.x as rope_scaling
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {**rope, "rope_theta": extra["rope_theta"]}
        else:
            cfg.rope_scaling = dict(rope)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, **_hf_dtype(torch.float32)).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.1) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    if arch == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tokenizer.path, tmp_path / "hf" / "tokenizer.json")

    model, _ = load_model_folder(tmp_path / "hf")
    assert model.cfg.attention_bias == (arch == "qwen2") and model.cfg.qk_norm == (arch == "qwen3")
    assert model.cfg.head_size == {"llama3": 32, "qwen3": 24}.get(arch, 16)
    assert (model.cfg.rope_scaling is not None) == (arch == "llama3")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = ids[:1, :8]
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:].tolist()
        tokens = prompt[0].tolist()
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert tokens[8:] == expected

    save_model_folder(model, Tokenizer.load(tmp_path / "hf"), tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", **_hf_dtype(torch.float32)).eval()
    assert type(again).__name__ == ("LlamaForCausalLM" if arch == "mistral" else type(hf).__name__)
    with torch.no_grad():
        assert (again(ids).logits - theirs).abs().max().item() < 1e-4


def test_an_unknown_folder_is_one_clear_message(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="neither a Hugging Face config"):
        load_model_folder(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        load_model_folder(tmp_path / "absent")


def test_a_tokenizer_larger_than_the_vocabulary_is_one_clear_message(tokenizer, tmp_path):
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size - 1, dim=16, n_layers=1, n_heads=2,
                                    n_kv_heads=1, ffn_dim=32))
    folder = save_model_folder(model, tokenizer, tmp_path)
    with pytest.raises(UserError, match=f"{tokenizer.vocab_size} tokens.*holds {tokenizer.vocab_size - 1}"):
        load_model_folder(folder)


def test_weights_that_do_not_fit_the_config_are_one_clear_message(tokenizer, tmp_path):
    folder = save_model_folder(_model(tokenizer), tokenizer, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(UserError, match=r"do not fit .*shapes differ: layers.0.feed_forward.w1.weight \(176, 64\)"):
        load_model_folder(folder)


def test_a_tied_folder_whose_head_differs_is_refused(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_model_folder(_model(tokenizer, tie_embeddings=True), tokenizer, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight differs"):
        load_model_folder(folder)
