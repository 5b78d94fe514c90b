"""A pretrained model's own tokenizer and chat template: its special tokens come from its folder, its template
renders the tokens `transformers`' apply_chat_template gives, and the SFT mask covers exactly its assistant turns
(equal to transformers' assistant mask where the template marks one)."""

from __future__ import annotations

import json

import pytest

from astrai_ds.data.chat import render_chat, render_response
from astrai_ds.data.chat_template import ChatTemplateError
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import DataError, UserError

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's template
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# Qwen2-Instruct's and SmolLM2-Instruct's: ChatML with a default system message of their own
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system"
         "\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         "assistant\n' }}{% endif %}")
SMOLLM2 = QWEN2.replace("You are a helpful assistant.",
                        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
# ChatML whose assistant turns are marked for transformers' return_assistant_tokens_mask
MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == "
          "'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
          "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
TEMPLATES = {  # name: (template, bos, eos, pad)
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None),
    "qwen2": (QWEN2, None, "<|im_end|>", "<|endoftext|>"),
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
    "marked": (MARKED, None, "<|im_end|>", None),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "请用一句话介绍长城。"},
     {"role": "assistant", "content": "长城是中国古代修建的防御工程。"},
     {"role": "user", "content": "And in English?"},
     {"role": "assistant", "content": "The Great Wall is an ancient defence, 21,196 km long 😀."}],
]


@pytest.fixture(scope="module")
def foreign_tokenizer(corpus_files, tmp_path_factory):
    """A byte-level BPE tokenizer.json with other models' special tokens and none of ours."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in corpus_files], trainer)
    path = tmp_path_factory.mktemp("foreign") / "tokenizer.json"
    tok.save(str(path))
    return path


def _folder(tokenizer_json, tmp_path, name: str, generation: dict | None = None):
    template, bos, eos, pad = TEMPLATES[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "chat_template": template}))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _hf_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_template_renders_transformers_tokens_and_masks_the_assistant_turns(name, foreign_tokenizer, tmp_path):
    folder = _folder(foreign_tokenizer, tmp_path, name)
    ours = Tokenizer.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert not ours.native and ours.chat_template == TEMPLATES[name][0]
    for messages in CONVERSATIONS:
        ids, mask = render_chat(ours, messages)
        assert ids == _hf_ids(theirs.apply_chat_template(messages, tokenize=True))
        prompt, _ = render_chat(ours, messages[:-1], add_generation_prompt=True)
        assert prompt == _hf_ids(theirs.apply_chat_template(messages[:-1], tokenize=True,
                                                            add_generation_prompt=True))
        # the mask: the assistant turns' text, their end-of-turn token included, nothing else
        trained = ours.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        eot = TEMPLATES[name][2]
        assert trained == "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
        if name == "marked":  # transformers' own assistant mask, from the template's generation blocks
            out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
            assert mask == list(out["assistant_masks"])
        # a response judged alone (DPO): the last assistant turn only, the text cut after its end-of-turn token
        response_ids, response_mask = render_response(ours, messages[:-1], messages[-1]["content"])
        assert response_ids == ids[:len(response_ids)]
        assert ours.decode([i for i, m in zip(response_ids, response_mask) if m], skip_special_tokens=False) == (
            messages[-1]["content"] + eot)


def test_special_tokens_and_stops_come_from_the_folder(foreign_tokenizer, tmp_path):
    llama = Tokenizer.load(_folder(foreign_tokenizer, tmp_path, "llama3",
                                   generation={"eos_token_id": [6, 0]}))
    assert llama.bos_id == llama.token_to_id("<|begin_of_text|>") and llama.eos_id == llama.token_to_id("<|eot_id|>")
    assert llama.pad_id == llama.eos_id  # no pad token: the eos token pads, never a new one
    assert llama.stop_ids == {llama.eos_id, 0, 6}  # every eos_token_id of generation_config.json
    assert llama.prefix_ids == []  # this tokenizer.json adds no BOS itself and add_bos_token is unset
    qwen = Tokenizer.load(_folder(foreign_tokenizer, tmp_path, "qwen2"))
    assert qwen.bos_id is None and qwen.pad_id == qwen.token_to_id("<|endoftext|>") and qwen.prefix_ids == []
    # special tokens decode as their text; plain text that spells one stays plain text when encoded
    assert qwen.token_bytes(qwen.eos_id) == b"<|im_end|>"
    assert qwen.eos_id not in qwen.encode("a <|im_end|> b")
    assert qwen.decode(qwen.encode("长城 😀 café")) == "长城 😀 café"


def test_a_folder_without_its_tokens_or_template_is_one_clear_message(foreign_tokenizer, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(foreign_tokenizer.read_bytes())
    with pytest.raises(DataError, match="no tokenizer_config.json beside it"):
        Tokenizer.load(bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match="eos_token '<\\|nope\\|>' is not a token"):
        Tokenizer.load(bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    plain = Tokenizer.load(bare)  # a base model: plain text works, chat does not
    assert plain.chat_template is None
    with pytest.raises(UserError, match="has no chat template"):
        render_chat(plain, CONVERSATIONS[0])
    (bare / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="the chat template failed: only user turns"):
        render_chat(Tokenizer.load(bare), CONVERSATIONS[0])
    (bare / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):  # the sandbox: no reaching into Python objects
        render_chat(Tokenizer.load(bare), CONVERSATIONS[0])


def _qwen2_folder(foreign_tokenizer, tmp_path):
    """(folder, model): a random 2-layer Qwen2 that `transformers` saved beside the foreign tokenizer and the Qwen2
    template, with two stop tokens in its generation_config.json."""
    import torch

    folder = _folder(foreign_tokenizer, tmp_path, "qwen2", generation={"eos_token_id": [2, 0]})
    vocab = Tokenizer.load(folder).vocab_size
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, use_sliding_window=False)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    return folder, hf


def test_a_pretrained_folder_with_its_own_tokenizer_chats_like_transformers(foreign_tokenizer, tmp_path):
    """A Qwen2 folder `transformers` saved with a tokenizer and template of its own (no astrai-ds token): our engine's
    chat prompt is apply_chat_template's, its greedy tokens are generate's (stopping at the folder's eos), and our
    export keeps the folder's special tokens, template and stop tokens."""
    import torch

    from astrai_ds.inference.engine import LLMEngine
    from astrai_ds.inference.sampling import SamplingParams
    from astrai_ds.model.io import load_model_folder, save_model_folder

    folder, hf = _qwen2_folder(foreign_tokenizer, tmp_path)
    model, tokenizer = load_model_folder(folder, dtype=torch.float32)
    messages = CONVERSATIONS[1][:-1]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = _hf_ids(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    engine = LLMEngine(model, tokenizer)
    assert engine.encode(messages) == prompt
    out = engine.generate(messages, SamplingParams(max_new_tokens=16, temperature=0))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id)[0]
    expected = expected[len(prompt):].tolist()
    assert out.token_ids == expected and out.finish_reason == "length"

    exported = save_model_folder(model, tokenizer, tmp_path / "export")
    again = Tokenizer.load(exported)
    assert (again.chat_template, again.special_tokens, again.stop_ids, again.pad_id) == (
        tokenizer.chat_template, tokenizer.special_tokens, tokenizer.stop_ids, tokenizer.pad_id)
    assert transformers.AutoTokenizer.from_pretrained(exported).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.multiproc  # a whole fine-tune, train.py in a process of its own
def test_a_pretrained_folder_fine_tunes_on_its_own_template_and_exports_it(foreign_tokenizer, tmp_path, capsys):
    """SFT data prepared with the folder's tokenizer is rendered with its template (mask on its assistant turns),
    train.py fine-tunes the folder (stage.init_from, the folder as tokenizer), and the run exports a folder with the
    same tokenizer, special tokens, stop tokens and template."""
    from astrai_ds.data.shards import TokenShards
    from conftest import cli_in_process, run_python

    folder, _ = _qwen2_folder(foreign_tokenizer, tmp_path)
    tokenizer = Tokenizer.load(folder)
    chats = tmp_path / "sft.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS * 8),
                     encoding="utf-8")
    proc = cli_in_process(capsys, "prepare", "--stage", "sft", "--input", str(chats), "--tokenizer", str(folder),
                          "--out", str(tmp_path / "data"), "--seq-len", "128")
    assert proc.returncode == 0, proc.stderr
    shards = TokenShards(tmp_path / "data")
    ids, mask = render_chat(tokenizer, CONVERSATIONS[0])
    assert shards.document_lengths()[0] == len(ids)
    assert shards.read(0, len(ids)).tolist() == ids and shards.read_mask(0, len(ids)).tolist() == mask
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "model": None, "tokenizer": str(folder), "output_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "data"), "seq_len": 128}, "stage": {"type": "sft", "init_from": str(folder)},
        "max_steps": 2, "micro_batch_size": 2, "save_interval": 2, "log_interval": 1, "eval_interval": 100,
        "precision": "fp32", "optimizer": {"lr": 0.001}, "schedule": {"warmup_steps": 1}}))
    run_python("train.py", ["--config", str(config), "--ds_config", "zero2.json"])
    assert cli_in_process(capsys, "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "tuned")
                          ).returncode == 0
    tuned = Tokenizer.load(tmp_path / "tuned")
    assert tuned.hash == tokenizer.hash and (tuned.chat_template, tuned.special_tokens, tuned.stop_ids) == (
        tokenizer.chat_template, tokenizer.special_tokens, tokenizer.stop_ids)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").config.model_type == "qwen2"
