"""Model folders: one format, which is also Hugging Face's (see model/hf.py), read and written without DeepSpeed
or `transformers`. Training (`stage.init_from`, the DPO reference), evaluation, generation and export all go
through here.

A folder holds config.json (LlamaConfig's schema, Qwen3Config's with QK-norm), model.safetensors (HF names,
lm_head.weight always present), generation_config.json, tokenizer.json and tokenizer_config.json (ChatML
template). Reading also accepts a folder `transformers` saved (tied heads left out, weights possibly sharded
into model-0000x-of-0000y.safetensors) and one that astrai_ds exported before it wrote HF's schema (config.json
holding a ModelConfig, our parameter names).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from astrai_ds.config.base import from_dict, read_json
from astrai_ds.config.model import ModelConfig
from astrai_ds.errors import UserError
from astrai_ds.model.hf import (DTYPE_NAMES, from_hf_config, from_hf_state_dict, generation_config,
                                is_hf_state_dict, to_hf_config, to_hf_state_dict, tokenizer_config)
from astrai_ds.model.transformer import Transformer

# Every file `save_model_folder` writes; loading needs config.json, the weights and tokenizer.json.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
_MAKE_ONE = "make one with `astrai-ds export --run RUN_DIR --out {}`"


def _not_a_model_folder(model_dir: Path, why: str) -> UserError:
    return UserError(f"{model_dir} is not a model folder: {why}; {_MAKE_ONE.format(model_dir)}")


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a folder's config.json: HF's schema (model_type llama or qwen3), or the ModelConfig
    itself as astrai_ds wrote it before."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise _not_a_model_folder(model_dir, "config.json is missing")
    data = read_json(path, "model config")
    if "model_type" in data:
        return from_hf_config(data, str(path))
    if not isinstance(data.get("vocab_size"), int) or "dim" not in data:
        raise UserError(f"{path} is neither a Hugging Face config (it has no model_type) nor an astrai_ds model "
                        f"config (no integer vocab_size and dim); {_MAKE_ONE.format(model_dir)}")
    return from_dict(ModelConfig, data, str(path))  # an export from before the HF schema


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's model.safetensors, or of the shards its model.safetensors.index.json lists."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS).is_file():
        files = [model_dir / WEIGHTS]
    elif (model_dir / WEIGHTS_INDEX).is_file():
        weight_map = read_json(model_dir / WEIGHTS_INDEX, "weights index").get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        other = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
        hint = (f" (it holds {', '.join(other)}: save it as safetensors, e.g. transformers' "
                f"save_pretrained(dir, safe_serialization=True))" if other else "")
        raise _not_a_model_folder(model_dir, f"model.safetensors is missing{hint}")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} cannot be read ({e}); export the model again") from None
    return tensors


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with every name and shape checked first, so a mismatch is one readable message."""
    check_state({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(state, strict=True)


def folder_state(cfg: ModelConfig, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """A model folder's weights under our parameter names (from Hugging Face's when the folder has those); a tied
    pair, saved under one of its two names, gets both."""
    tensors = read_weights(model_dir)
    if is_hf_state_dict(tensors):
        return from_hf_state_dict(tensors, cfg, str(model_dir))
    state = dict(tensors)
    pair = ("embed.tok_embeddings.weight", "head.output.weight")
    if cfg.tie_embeddings:
        for a, b in (pair, pair[::-1]):
            if a not in state and b in state:
                state[a] = state[b]
    return state


def check_state(expected: dict[str, tuple], state: dict[str, torch.Tensor], source: str) -> None:
    """Every name of `expected` ({name: shape}) in `state` with that shape, and nothing else: else one readable
    UserError."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {shape}" for k, shape in expected.items()
              if k in state and tuple(state[k].shape) != shape]
    problems = [f"{what} {_few(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if names]
    if problems:
        raise UserError(f"{source}: the weights do not fit the model of its config.json ({'; '.join(problems)})")


def load_weights(model: Transformer, model_dir: str | Path) -> None:
    """Load a model folder's weights into `model` (same shape), e.g. to fine-tune from it."""
    _load_exact(model, folder_state(model.cfg, model_dir), str(model_dir))


def load_model_folder(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer) from a model folder, in eval mode; no DeepSpeed or transformers involved."""
    from astrai_ds.data.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise _not_a_model_folder(model_dir, "no such folder")
    cfg = read_model_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise _not_a_model_folder(model_dir, "tokenizer.json is missing")
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"holds {cfg.vocab_size} (vocab_size in config.json): the tokenizer is not this model's")
    model = Transformer(cfg)
    load_weights(model, model_dir)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), tokenizer


def _umask_mode() -> int:
    """The mode a new file gets under the process's umask (read by setting it, then restoring it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_model_folder(model: Transformer, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` (weights in its current dtype) and `tokenizer` as the model folder `out_dir`, overwriting
    the files of MODEL_FILES there. The same model gives the same bytes. Files follow the umask."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot save weights of dtype {dtype}; use one of {', '.join(map(str, DTYPE_NAMES))}")
    weights = out_dir / WEIGHTS
    # "format": "pt" is what transformers checks before it trusts a safetensors file. It is the only metadata key:
    # safetensors writes several in a random order, and an export should be byte-identical when its weights are.
    save_file(to_hf_state_dict(model), str(weights), metadata={"format": "pt"})
    weights.chmod(_umask_mode())  # safetensors creates it 0600 whatever the umask
    files = {
        "config.json": to_hf_config(model.cfg, tokenizer, dtype),
        "generation_config.json": generation_config(tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, model.cfg.max_seq_len),
    }
    for name, data in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # the tokenizer's exact bytes: its hash is what shards, runs and the DPO reference check
    (out_dir / "tokenizer.json").write_bytes(Path(tokenizer.path).read_bytes())
    return out_dir
