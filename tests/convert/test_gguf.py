"""GGUF in: `astrai-ds import --gguf` on a real model, SmolLM2-135M-Instruct (llama.cpp's Q4_1 file): the folder
gives the logits and token ids that `transformers` reads from the same file, answers a question sensibly, and a
file the import cannot read is one clear message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from astrai_ds.model.io import load_model_folder
from conftest import cli_in_process, expect_user_error

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of France is", "长城是中国古代修建的防御工程，全长两万多公里。",
         "def square(x):\n    return x ** 2  # 12345 😀", "Mixed 中文 and English, café, naïve, 3.14159!",
         "  leading spaces\tand tabs\r\nand a new line"]


@pytest.mark.multiproc  # slow: transformers reads the GGUF file itself (about 16 s)
def test_the_imported_folder_gives_transformers_logits_and_token_ids(smollm2_gguf, smollm2_dir):
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, tokenizer = load_model_folder(smollm2_dir, dtype=torch.float32)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        49152, 576, 30, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.prefix_ids) == (1, 2, [])  # no BOS before plain text
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    for text in TEXTS:
        assert tokenizer.prefix_ids + tokenizer.encode(text) == hf_tok(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([hf_tok(TEXTS[0])["input_ids"] + hf_tok(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    from astrai_ds.data.chat import render_chat

    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert render_chat(tokenizer, messages, add_generation_prompt=True)[0] == list(
        expected["input_ids"] if hasattr(expected, "keys") else expected)


@pytest.mark.multiproc  # slow: the whole import of a real model
def test_the_imported_model_answers_a_question(smollm2_dir, capsys):
    proc = cli_in_process(capsys, "generate", "--model", str(smollm2_dir), "--chat", "--prompt",
                          "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "12",
                          "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    assert "finish: stop" in proc.stderr  # it ends its turn with its own <|im_end|>


def test_what_the_import_cannot_read_is_one_clear_message(smollm2_gguf, tmp_path, capsys):
    out = str(tmp_path / "out")
    proc = cli_in_process(capsys, "import", "--gguf", str(tmp_path / "missing.gguf"), "--out", out)
    expect_user_error(proc, "missing.gguf", "no such file")
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src:
        truncated.write_bytes(src.read(4 << 20))
    proc = cli_in_process(capsys, "import", "--gguf", str(truncated), "--out", out)
    expect_user_error(proc, str(truncated), "cannot be read as a GGUF file")
    not_gguf = tmp_path / "config.gguf"
    not_gguf.write_text(json.dumps({"model_type": "llama"}))
    expect_user_error(cli_in_process(capsys, "import", "--gguf", str(not_gguf), "--out", out), str(not_gguf))

    import gguf

    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = cli_in_process(capsys, "import", "--gguf", str(other), "--out", out)
    expect_user_error(proc, "architecture 'gpt2'", "llama, qwen2, qwen3")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    proc = cli_in_process(capsys, "import", "--gguf", str(smollm2_gguf), "--out", str(taken))
    expect_user_error(proc, str(taken), "not empty")
    assert (taken / "notes.txt").read_text() == "mine\n" and not (tmp_path / "out").exists()
    shutil.rmtree(taken)


# ---------------------------------------------------------------- GGUF out


def _rounded(model, dtype):
    """A float32 copy of `model` whose weights went through `dtype` (what an f16 or bf16 file holds)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if param.dim() > 1:  # norms and biases stay float32 in the file
                param.copy_(param.to(dtype).float())
    return twin


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_a_gguf_export_reads_back_in_transformers_and_in_our_import(outtype, model_dir, tmp_path, capsys):
    """Our tiny model (our tokenizer: BOS first, digits split, ChatML) as GGUF: `transformers` reads the file with
    our token ids and our logits (f16: those of our weights rounded to f16; q8_0: those of the same file read by our
    import), and our import of it gives the model back."""
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    out = tmp_path / f"tiny-{outtype}.gguf"
    proc = cli_in_process(capsys, "export", "--model", str(model_dir), "--format", "gguf", "--outtype", outtype,
                          "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.part"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tokenizer.prefix_ids + tokenizer.encode(text), text
    assert hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                      add_generation_prompt=True) == "<bos><|im_start|>user\n你好<|im_end|>\n" \
                                                                    "<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.prefix_ids + tokenizer.encode(TEXTS[0] + TEXTS[1])])
    back, back_tok = load_model_folder(cli_import(out, tmp_path / "back", capsys), dtype=torch.float32)
    assert back_tok.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2]) and back_tok.stop_ids == tokenizer.stop_ids
    expected = {"f32": model, "f16": _rounded(model, torch.float16), "q8_0": back}[outtype]
    with torch.no_grad():
        assert (hf(ids).logits - expected(ids)).abs().max().item() < 1e-4
        if outtype == "f32":
            assert torch.equal(back(ids), model(ids))


def cli_import(gguf_file, out, capsys):
    proc = cli_in_process(capsys, "import", "--gguf", str(gguf_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.multiproc  # slow: transformers reads a 270 MB GGUF file
def test_smollm2_exports_to_gguf_with_its_own_tokenizer(smollm2_dir, tmp_path, capsys):
    """The imported SmolLM2 back out as f16 GGUF: llama.cpp's Q/K order, its GPT-2-style tokenizer with SmolLM's
    digit split, its special tokens and chat template: `transformers` reads it with our logits (f16 weights)."""
    out = tmp_path / "smollm2-f16.gguf"
    assert cli_in_process(capsys, "export", "--model", str(smollm2_dir), "--format", "gguf", "--out", str(out)
                          ).returncode == 0
    model, tokenizer = load_model_folder(smollm2_dir, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert hf_tok.chat_template == tokenizer.chat_template
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text), text
    ids = torch.tensor([tokenizer.encode(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        assert (hf(ids).logits - _rounded(model, torch.float16)(ids)).abs().max().item() < 1e-3


def test_what_gguf_export_cannot_write_is_one_clear_message(model_dir, tmp_path, capsys):
    proc = cli_in_process(capsys, "export", "--model", str(model_dir), "--format", "gguf", "--out", str(tmp_path))
    expect_user_error(proc, str(tmp_path), ".gguf file")
    proc = cli_in_process(capsys, "export", "--model", str(model_dir), "--out", str(tmp_path / "m"))
    expect_user_error(proc, "--model is for --format gguf")
    # a tokenizer whose pre-tokenizer llama.cpp has no name for would split text differently there
    folder = tmp_path / "odd"
    shutil.copytree(model_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    proc = cli_in_process(capsys, "export", "--model", str(folder), "--format", "gguf", "--out",
                          str(tmp_path / "odd.gguf"))
    expect_user_error(proc, "pre-tokenizer", "llama.cpp")
    assert not list(tmp_path.glob("*.gguf*"))
