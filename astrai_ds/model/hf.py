"""Hugging Face's model-folder schema, which is also ours: `transformers` loads an exported folder as
LlamaForCausalLM (Qwen3ForCausalLM when qk_norm is on, Llama's layout plus QK-norm; Qwen2ForCausalLM with q/k/v
biases), and a Llama, Mistral (without sliding window), Qwen2 or Qwen3 folder that `transformers` saved loads
here.

This module only translates: ModelConfig <-> config.json, our parameter names <-> HF's (HF_LLAMA_NAMES), and
the tokenizer's special tokens and chat template -> tokenizer_config.json and generation_config.json. It never
imports `transformers` (an optional extra); model/io.py reads and writes the files.
"""

from __future__ import annotations

import torch

from astrai_ds.config.base import from_dict
from astrai_ds.config.model import ModelConfig, RopeScaling
from astrai_ds.errors import UserError
from astrai_ds.model.transformer import from_hf_llama_name, hf_llama_name

# model_type -> class: the Llama layout and its relatives that our Transformer runs. Mistral is Llama's layout (without
# its sliding window); Qwen2 adds q/k/v biases; Qwen3 adds QK-norm and its own head_dim.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ChatML, rendered as data.chat.render_chat renders it: <bos>, then per message
# `<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n` for the generation prompt.
# HF renders this string and encodes it once; render_chat encodes the header and the content apart, so the ids
# agree except where a token could cross that boundary (see docs/checkpoints.md, "Export and evaluation").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------- config.json


def _model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a ModelConfig is: Qwen3 with QK-norm, Qwen2 with q/k/v biases, else Llama."""
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"


def _rope(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    return {"rope_type": s.rope_type, "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def to_hf_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json in LlamaConfig's schema (Qwen3Config's with QK-norm, Qwen2Config's with q/k/v biases) for
    weights stored in `dtype`.

    RoPE is written both ways transformers has read it: `rope_parameters` (5.x) and a top-level `rope_theta` with
    `rope_scaling` (4.x, which keeps the unknown `rope_parameters` as a plain attribute); the dtype likewise as
    `dtype` and `torch_dtype`."""
    model_type = _model_type(cfg)
    rope = _rope(cfg)
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2Config and Qwen3Config default to a sliding window on layers >= max_window_layers unless told
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if model_type == "qwen3":
            out["attention_bias"] = False
    return out


def _rope_scaling(data: dict, source: str) -> RopeScaling | None:
    """The RoPE scaling of a config.json (`rope_parameters` in transformers 5, `rope_scaling` before): None for
    plain RoPE, Llama 3's, or a UserError naming any other."""
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {"rope_type": rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UserError(f"{source}: RoPE scaling {rope_type!r}, which astrai_ds's Transformer does not implement "
                        f"(it runs plain RoPE and Llama 3's 'llama3' scaling)")
    fields = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
              if k in rope}
    return from_dict(RopeScaling, {"rope_type": "llama3", **fields}, f"{source} rope_scaling")


def _unsupported(data: dict, model_type: str) -> list[str]:
    """What in a config.json of `model_type` our Transformer cannot run, as 'key value' strings."""
    found = []
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0)) != 1.0:
        found.append(f"partial_rotary_factor {rope.get('partial_rotary_factor', data.get('partial_rotary_factor'))}")
    # Qwen2's q/k/v biases are built in; Llama's and Qwen3's attention_bias would add one to o_proj too
    checks = [("hidden_act", "silu"), ("mlp_bias", False)]
    if model_type in ("llama", "qwen3"):
        checks.append(("attention_bias", False))
    if model_type in ("qwen2", "qwen3"):
        checks.append(("use_sliding_window", False))
    for key, ours in checks:
        if data.get(key, ours) != ours:
            found.append(f"{key} {data[key]!r}")
    if model_type == "mistral" and data.get("sliding_window") is not None:
        found.append(f"sliding_window {data['sliding_window']} (sliding-window attention)")
    return found


def from_hf_config(data: dict, source: str) -> ModelConfig:
    """The ModelConfig of a Llama, Mistral, Qwen2 or Qwen3 config.json (`source` names the file in messages). Keys
    that do not change the computation are ignored; anything our Transformer cannot run is a UserError."""
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(data.get("architectures") or []) or "no architectures listed"
        known = ", ".join(f"'{t}' ({c})" for t, c in ARCHITECTURES.items())
        raise UserError(f"{source}: a Hugging Face model of type {model_type!r} ({arch}); astrai_ds runs the "
                        f"Llama layout and its relatives only: model_type {known}")
    problems = _unsupported(data, model_type)
    if problems:
        raise UserError(f"{source}: this {model_type} model uses {', '.join(problems)}, which astrai_ds's "
                        f"Transformer does not implement")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in data]
    if missing:
        raise UserError(f"{source}: the {model_type} config lacks {', '.join(missing)}")
    rope = data.get("rope_parameters") or {}
    # Qwen3Config's head_dim defaults to 128 whatever the hidden size; the others' to hidden_size / heads
    head_dim = data.get("head_dim") or (128 if model_type == "qwen3" else None)
    if head_dim == data["hidden_size"] // data["num_attention_heads"]:
        head_dim = None  # the default: keep the config as one trained from scratch would be
    mapped = {
        "vocab_size": data["vocab_size"],
        "dim": data["hidden_size"],
        "n_layers": data["num_hidden_layers"],
        "n_heads": data["num_attention_heads"],
        "n_kv_heads": data.get("num_key_value_heads") or data["num_attention_heads"],
        "ffn_dim": data["intermediate_size"],
        # transformers' own defaults where a key is absent (LlamaConfig's; the others' differ only in the
        # context length, which their config.json files state)
        "max_seq_len": data.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        "norm_eps": float(data.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(data.get("tie_word_embeddings", False)),
        "qk_norm": model_type == "qwen3",
        "init_std": float(data.get("initializer_range", 0.02)),
        "head_dim": head_dim,
        "attention_bias": model_type == "qwen2",
    }
    cfg = from_dict(ModelConfig, mapped, source)
    cfg.rope_scaling = _rope_scaling(data, source)
    return cfg


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
    """tokenizer_config.json: our tokenizer.json as a plain PreTrainedTokenizerFast, with the ChatML template; a
    pretrained model's tokenizer with the special tokens and chat template its folder had.

    No unk token: byte-level BPE encodes every string. clean_up_tokenization_spaces is off, or HF's decode
    would join " ," and " ." that ours keeps."""
    if not tokenizer.native:
        return {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens,
                "chat_template": tokenizer.chat_template, "model_max_length": max_seq_len,
                "clean_up_tokenization_spaces": False, "add_bos_token": bool(tokenizer.prefix_ids)}
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
    """generation_config.json: a document ends at <eos>, an assistant turn at <|im_end|>; both stop generation (a
    pretrained model's: its eos token first, then every other stop token its folder named)."""
    if not tokenizer.native:
        stops = [tokenizer.eos_id] + sorted(tokenizer.stop_ids - {tokenizer.eos_id})
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": tokenizer.pad_id}
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.im_end_id],
        "pad_token_id": tokenizer.pad_id,
    }
