"""Hugging Face's model-folder schema, which is also ours: `transformers` loads an exported folder as
LlamaForCausalLM (Qwen3ForCausalLM when qk_norm is on, Llama's layout plus QK-norm), and a Llama or Qwen3
folder that `transformers` saved loads here.

This module only translates: ModelConfig <-> config.json, our parameter names <-> HF's (HF_LLAMA_NAMES), and
the tokenizer's special tokens and chat template -> tokenizer_config.json and generation_config.json. It never
imports `transformers` (an optional extra); model/io.py reads and writes the files.
"""

from __future__ import annotations

import torch

from astrai_ds.config.base import from_dict
from astrai_ds.config.model import ModelConfig
from astrai_ds.errors import UserError
from astrai_ds.model.transformer import from_hf_llama_name, hf_llama_name

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # model_type -> class, qk_norm off/on
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ChatML, rendered as data.chat.render_chat renders it: <bos>, then per message
# `<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n` for the generation prompt.
# HF renders this string and encodes it once; render_chat encodes the header and the content apart, so the ids
# agree except where a token could cross that boundary (see README, "Export and evaluation").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------- config.json


def to_hf_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json in LlamaConfig's schema (Qwen3Config's when cfg.qk_norm) for weights stored in `dtype`.

    RoPE is written both ways transformers has read it: `rope_parameters` (5.x) and a top-level `rope_theta`
    (4.x, which keeps the unknown `rope_parameters` as a plain attribute); the dtype likewise as `dtype` and
    `torch_dtype`."""
    model_type = "qwen3" if cfg.qk_norm else "llama"
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    if model_type == "llama":
        out["mlp_bias"] = False
    else:  # Qwen3Config defaults to a sliding window on layers >= max_window_layers unless told otherwise
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


def _unsupported(data: dict) -> list[str]:
    """What in a Llama/Qwen3 config.json our Transformer cannot run, as 'key value' strings."""
    found = []
    heads = data.get("num_attention_heads") or 1
    # Qwen3Config's head_dim defaults to 128 whatever the hidden size; LlamaConfig's to hidden_size / heads
    head_dim = data.get("head_dim", 128 if data.get("model_type") == "qwen3" else None)
    if head_dim is not None and head_dim != data.get("hidden_size", 0) // heads:
        found.append(f"head_dim {head_dim} (not hidden_size / num_attention_heads)")
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {"rope_type": rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        found.append(f"RoPE scaling {rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        found.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    for key, ours in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("use_sliding_window", False)):
        if data.get(key, ours) != ours:
            found.append(f"{key} {data[key]!r}")
    return found


def from_hf_config(data: dict, source: str) -> ModelConfig:
    """The ModelConfig of a Llama or Qwen3 config.json (`source` names the file in messages). Keys that do not
    change the computation are ignored; anything our Transformer cannot run is a UserError."""
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(data.get("architectures") or []) or "no architectures listed"
        raise UserError(f"{source}: a Hugging Face model of type {model_type!r} ({arch}); astrai_ds runs the "
                        f"Llama layout only: model_type 'llama' (LlamaForCausalLM) or 'qwen3' (Qwen3ForCausalLM)")
    problems = _unsupported(data)
    if problems:
        raise UserError(f"{source}: this {model_type} model uses {', '.join(problems)}, which astrai_ds's "
                        f"Transformer does not implement")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in data]
    if missing:
        raise UserError(f"{source}: the {model_type} config lacks {', '.join(missing)}")
    rope = data.get("rope_parameters") or {}
    mapped = {
        "vocab_size": data["vocab_size"],
        "dim": data["hidden_size"],
        "n_layers": data["num_hidden_layers"],
        "n_heads": data["num_attention_heads"],
        "n_kv_heads": data.get("num_key_value_heads") or data["num_attention_heads"],
        "ffn_dim": data["intermediate_size"],
        # transformers' own defaults where a key is absent (LlamaConfig's; Qwen3Config's differ only in the
        # context length, which every Qwen3 config.json states)
        "max_seq_len": data.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        "norm_eps": float(data.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(data.get("tie_word_embeddings", False)),
        "qk_norm": model_type == "qwen3",
        "init_std": float(data.get("initializer_range", 0.02)),
    }
    return from_dict(ModelConfig, mapped, source)


# ---------------------------------------------------------------- model.safetensors


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under HF's names, contiguous and unshared, ready for safetensors.

    `lm_head.weight` is there even when tied (DeepSpeed-FastGen reads it): a copy, since safetensors refuses
    two names for one storage."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[hf_llama_name(name)] = t.clone() if key in seen else t.contiguous()
        seen.add(key)
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """HF-named tensors -> our names. With tied embeddings, `lm_head.weight` may be absent (transformers leaves
    it out); when present it must equal the embedding."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF checkpoints
    if cfg.tie_embeddings and "model.embed_tokens.weight" in tensors:
        head = tensors.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
            raise UserError(f"{source}: config.json ties the embeddings (tie_word_embeddings) but lm_head.weight "
                            f"differs from model.embed_tokens.weight; the folder is inconsistent")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    out = {}
    for name, t in tensors.items():
        try:
            out[from_hf_llama_name(name)] = t
        except KeyError:
            raise UserError(f"{source}: tensor {name!r} has no counterpart in astrai_ds's Transformer "
                            f"(a Llama layout is expected)") from None
    return out


def is_hf_state_dict(names) -> bool:
    """Whether tensor names are HF's (`model.…`, `lm_head.…`) rather than ours (`embed.…`, `layers.…`)."""
    return any(n.startswith(("model.", "lm_head.")) for n in names)


# ---------------------------------------------------------------- tokenizer and generation


def tokenizer_config(tokenizer, max_seq_len: int) -> dict:
    """tokenizer_config.json: our tokenizer.json as a plain PreTrainedTokenizerFast, with the ChatML template.

    No unk token: byte-level BPE encodes every string. clean_up_tokenization_spaces is off, or HF's decode
    would join " ," and " ." that ours keeps."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",  # for batched generation, as ours pads
    }


def generation_config(tokenizer) -> dict:
    """generation_config.json: a document ends at <eos>, an assistant turn at <|im_end|>; both stop generation."""
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.im_end_id],
        "pad_token_id": tokenizer.pad_id,
    }
