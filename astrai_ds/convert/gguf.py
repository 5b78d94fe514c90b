"""GGUF, llama.cpp's model file, into a model folder (`astrai-ds import --gguf FILE --out DIR`), with the `gguf`
package that llama.cpp publishes.

What is read: the hyper-parameters under the file's architecture (`llama`, `qwen2`, `qwen3`), every tensor,
dequantized to float32 by `gguf.quants` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K to Q6_K,
among others), with llama.cpp's Q/K row permutation undone for `llama` (its converter interleaves the two RoPE
halves of each head; Qwen's rotate the halves as Hugging Face does and are stored as they are), and the byte-level
BPE tokenizer (`tokenizer.ggml.model` "gpt2": tokens, merges, token types, the pre-tokenizer that
`tokenizer.ggml.pre` names) with its special tokens and `tokenizer.chat_template`. The folder is the one `export`
writes (safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json), so `transformers`
and every command here load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from astrai_ds.config.base import from_dict
from astrai_ds.config.model import ModelConfig
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import UserError
from astrai_ds.model.transformer import from_hf_llama_name, hf_llama_name

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`)
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}

# The pre-tokenizer split of `tokenizer.ggml.pre` (llama.cpp's names), as `tokenizers` pre-tokenizers: GPT-2's
# regex (ByteLevel's own), with single digits split off first (StarCoder, SmolLM), or Llama 3's and Qwen2's regexes.
_GPT2 = "gpt2"
_DIGITS_THEN_GPT2 = "digits+gpt2"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "smollm": _DIGITS_THEN_GPT2,
                  "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2,
                  "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types that are added tokens (special / not)


class _File:
    """A GGUF file's fields as plain Python values, and its tensors."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        if not path.is_file():
            raise UserError(f"{path}: no such file; give --gguf a .gguf file")
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
            raise UserError(f"{path} cannot be read as a GGUF file ({type(e).__name__}: {e}); is it whole?") from None
        self.path = path

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path} lacks the GGUF key {key}; the file is not a complete model")
        return value


def _config(f: _File, arch: str, names: set[str]) -> ModelConfig:
    dim, heads = f.need(f"{arch}.embedding_length"), f.need(f"{arch}.attention.head_count")
    head_dim = f.get(f"{arch}.attention.key_length", dim // heads)
    rotary = f.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise UserError(f"{f.path}: RoPE on {rotary} of {head_dim} dimensions per head (partial rotary), which "
                        f"astrai_ds's Transformer does not implement")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise UserError(f"{f.path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}), which this "
                        f"import does not read yet; import the model's Hugging Face folder instead")
    vocab = f.get(f"{arch}.vocab_size") or len(f.need("tokenizer.ggml.tokens"))
    data = {
        "vocab_size": vocab, "dim": dim, "n_layers": f.need(f"{arch}.block_count"), "n_heads": heads,
        "n_kv_heads": f.get(f"{arch}.attention.head_count_kv", heads),
        "ffn_dim": f.need(f"{arch}.feed_forward_length"),
        "max_seq_len": f.get(f"{arch}.context_length", 2048),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_embeddings": "output.weight" not in names,
        "qk_norm": "blk.0.attn_q_norm.weight" in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "head_dim": head_dim if head_dim != dim // heads else None,
    }
    return from_dict(ModelConfig, data, str(f.path))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head, rows stored as interleaved pairs (x0, x_half, x1, ...) back to
    the two halves Hugging Face's rotate_half expects."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(f: _File, arch: str, cfg: ModelConfig, progress: bool) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under our parameter names."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from tqdm import tqdm

    out = {}
    for t in tqdm(f.reader.tensors, desc="dequantizing", unit="tensor", disable=not progress):
        name = t.name
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            hf = f"model.layers.{layer}.{_BLOCK_NAMES[rest]}" if rest in _BLOCK_NAMES else None
        else:
            hf = _TOP_NAMES.get(name)
        if hf is None:
            raise UserError(f"{f.path}: tensor {name!r} has no counterpart in astrai_ds's Transformer")
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            kind = GGMLQuantizationType(t.tensor_type).name
            raise UserError(f"{f.path}: tensor {name} is {kind}, which the gguf package cannot dequantize "
                            f"({e})") from None
        # a copy: an F32 tensor comes back as a read-only view of the memory-mapped file
        w = np.array(w, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
        out[from_hf_llama_name(hf)] = torch.from_numpy(np.ascontiguousarray(w))
    if cfg.tie_embeddings:
        out["head.output.weight"] = out["embed.tok_embeddings.weight"]
    return out


def _tokenizer_json(f: _File) -> str:
    """tokenizer.json (the `tokenizers` library's format) rebuilt from the file's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = f.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{f.path}: tokenizer.ggml.model {kind!r}; this import rebuilds byte-level BPE tokenizers "
                        f"('gpt2': GPT-2, Llama 3, Qwen, SmolLM) only")
    pre = f.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise UserError(f"{f.path}: tokenizer.ggml.pre {pre!r}, a pre-tokenizer this import does not know (it knows "
                        f"{', '.join(sorted(PRE_TOKENIZERS))})")
    tokens, types = f.need("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in f.need("tokenizer.ggml.merges")]
    # Llama 3's tokenizer takes a word found whole in the vocabulary as it is, before any merge
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=split == _LLAMA3_REGEX))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (_GPT2, _DIGITS_THEN_GPT2))
    if split == _GPT2:
        tok.pre_tokenizer = byte_level
    elif split == _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(t, special=types[i] == _CONTROL, normalized=False)
             for i, t in enumerate(tokens) if i < len(types) and types[i] in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok.to_str()


def _token(f: _File, key: str) -> str | None:
    token_id = f.get(f"tokenizer.ggml.{key}_token_id")
    tokens = f.need("tokenizer.ggml.tokens")
    return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None


def import_gguf(gguf_file: str | Path, out_dir: str | Path, progress: bool = False, dtype: str = "fp32") -> Path:
    """Write the model folder `out_dir` (new, empty, or a model folder to overwrite) from a GGUF file, its weights
    in `dtype` ("fp32", "bf16", "fp16")."""
    from astrai_ds.convert.export import DTYPES, _check_model_out_dir, write_model_folder
    from astrai_ds.model import Transformer
    from astrai_ds.model.io import save_model_folder

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if gguf_file.is_file():
        _check_model_out_dir(out_dir)  # before the file is read: a wrong --out costs nothing
    f = _File(gguf_file)
    arch = f.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{gguf_file}: a GGUF model of architecture {arch!r}; astrai_ds runs "
                        f"{', '.join(ARCHITECTURES)} (the Llama layout and its relatives)")
    names = {t.name for t in f.reader.tensors}
    cfg = _config(f, arch, names)
    tokenizer_json = _tokenizer_json(f)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": _token(f, "bos"),
              "eos_token": _token(f, "eos"), "pad_token": _token(f, "padding"), "unk_token": _token(f, "unknown"),
              "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False))}
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    stops = [f.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    generation = {"eos_token_id": [s for s in dict.fromkeys(stops) if isinstance(s, int)]}
    tokenizer = Tokenizer(out_dir / "tokenizer.json", tokenizer_json.encode("utf-8"), config, generation)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{gguf_file}: the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    model = Transformer(cfg)
    model.load_state_dict(_tensors(f, arch, cfg, progress), strict=True)
    model.to(DTYPES[dtype])

    def write(folder: Path) -> None:
        (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        save_model_folder(model, Tokenizer(folder / "tokenizer.json", tokenizer_json.encode("utf-8"), config,
                                           generation), folder)

    return write_model_folder(out_dir, write)


# ---------------------------------------------------------------- GGUF out

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _pre_name(tokenizer_json: dict, source: str) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # single digits first, then GPT-2's split: ours, SmolLM's and StarCoder's
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, known in (("llama-bpe", _LLAMA3_REGEX), ("qwen2", _QWEN2_REGEX)):
            if regex == known:
                return name
    raise UserError(f"{source}: its pre-tokenizer ({' + '.join(map(str, kinds))}) matches none that llama.cpp names "
                    f"(GPT-2, SmolLM, Llama 3, Qwen2), so a GGUF file of it would split text differently")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for `llama` (the inverse of `_unpermute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3's RoPE scaling: per frequency, the divisor of its angle."""
    from astrai_ds.model.rope import llama3_inv_freq

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2, dtype=torch.float64) / cfg.head_size)
    return (inv_freq / llama3_inv_freq(inv_freq, cfg.rope_scaling)).float().numpy()


def export_gguf(model, tokenizer, out_file: str | Path, outtype: str = "f16", name: str = "astrai_ds") -> Path:
    """Write `model` and `tokenizer` as a GGUF file llama.cpp runs: architecture llama (qwen2 with q/k/v biases,
    qwen3 with QK-norm), llama.cpp's hyper-parameter keys and Q/K row order, the tokenizer (tokens, merges, types,
    the pre-tokenizer's name, special tokens, chat template); 2-D weights in `outtype`, norms and biases in F32, a
    tied output matrix left out (llama.cpp reads the embedding)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from astrai_ds.model.hf import CHAT_TEMPLATE

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    cfg, out_file = model.cfg, Path(out_file)
    arch = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"
    data = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    bpe = data.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise UserError(f"{tokenizer.path}: GGUF export writes byte-level BPE tokenizers only")
    pre = _pre_name(data, str(tokenizer.path))

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".part")  # written whole, then renamed: a kill leaves no half file
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama.cpp's hyper-parameter keys ({arch}.context_length, ...), by the writer's method for each
    for key, value in (("context_length", cfg.max_seq_len), ("embedding_length", cfg.dim),
                       ("block_count", cfg.n_layers), ("feed_forward_length", cfg.ffn_dim),
                       ("head_count", cfg.n_heads), ("head_count_kv", cfg.n_kv_heads),
                       ("rope_freq_base", cfg.rope_theta), ("layer_norm_rms_eps", cfg.norm_eps),
                       ("key_length", cfg.head_size), ("value_length", cfg.head_size),
                       ("rope_dimension_count", cfg.head_size), ("vocab_size", cfg.vocab_size)):
        getattr(writer, f"add_{key}")(value)

    # the tokenizer: every id up to the model's vocabulary (rows past the tokenizer's are unused padding)
    specials = tokenizer.added_tokens()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in specials else
                         gguf.TokenType.CONTROL if specials[token] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.native:
        writer.add_eot_token_id(tokenizer.im_end_id)  # an assistant turn ends there
    writer.add_add_bos_token(bool(tokenizer.prefix_ids))
    writer.add_add_eos_token(False)
    template = CHAT_TEMPLATE if tokenizer.native else tokenizer.chat_template
    if template:
        writer.add_chat_template(template)

    def add(name: str, tensor: torch.Tensor) -> None:
        w = tensor.detach().float().cpu().numpy()
        if w.ndim == 1 or outtype == "f32":
            writer.add_tensor(name, w.astype(np.float32))
        elif outtype == "f16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
            if qtype == Q.Q8_0 and w.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32: llama.cpp keeps F16 then
                writer.add_tensor(name, w.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    state = model.state_dict()
    add("token_embd.weight", state["embed.tok_embeddings.weight"])
    if cfg.rope_scaling is not None:
        writer.add_tensor("rope_freqs.weight", _llama3_factors(cfg))
    ours_to_gguf = {hf: g for g, hf in _BLOCK_NAMES.items()}
    for i in range(cfg.n_layers):
        for key, tensor in state.items():
            prefix = f"layers.{i}."
            if not key.startswith(prefix):
                continue
            hf = hf_llama_name(key).removeprefix(f"model.layers.{i}.")
            w = tensor
            if arch == "llama" and hf in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                n = cfg.n_heads if hf.startswith("self_attn.q") else cfg.n_kv_heads
                w = torch.from_numpy(_permute(tensor.detach().float().cpu().numpy(), n))
            add(f"blk.{i}.{ours_to_gguf[hf]}", w)
    add("output_norm.weight", state["head.norm.weight"])
    if not cfg.tie_embeddings:
        add("output.weight", state["head.output.weight"])

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    except BaseException:  # a full disk, an interrupt: no half file left behind
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out_file)
    return out_file
