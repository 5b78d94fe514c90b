"""Model folders: load an exported folder (config.json, model.safetensors, tokenizer.json) without DeepSpeed.
Training (`stage.init_from`, the DPO reference), evaluation and export all read folders through here."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model

from astrai_ds.config.model import ModelConfig
from astrai_ds.errors import UserError
from astrai_ds.model.transformer import Transformer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what a model folder holds


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load an exported folder's weights into `model` (same shape), e.g. to fine-tune from it."""
    path = Path(model_dir) / "model.safetensors"
    if not path.exists():
        raise UserError(f"{model_dir} is not a model folder: model.safetensors is missing; make one with "
                        f"`astrai-ds export --run RUN_DIR --out {model_dir}`")
    load_model(model, str(path), strict=True)


def load_model_folder(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer) from an exported folder, in eval mode; no DeepSpeed involved."""
    from astrai_ds.data.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    for name in MODEL_FILES:
        if not (model_dir / name).exists():
            raise UserError(f"{model_dir} is not a model folder: {name} is missing; make one with "
                            f"`astrai-ds export --run RUN_DIR --out {model_dir}`")
    model = Transformer(ModelConfig.load(model_dir / "config.json"))
    load_weights(model, model_dir)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), Tokenizer.load(model_dir / "tokenizer.json")
