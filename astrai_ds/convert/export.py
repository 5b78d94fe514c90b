"""Export a DeepSpeed run to a model folder that loads without DeepSpeed.

A model folder holds `config.json` (the resolved model config), `model.safetensors` and `tokenizer.json`.
ZeRO-1/2/3 checkpoints keep the fp32 master weights split across ranks' optimizer files; DeepSpeed's
zero_to_fp32 helpers gather them into one state dict. Without ZeRO the module weights are read directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from astrai_ds.config.model import ModelConfig
from astrai_ds.errors import UserError
from astrai_ds.training.checkpoint import COMPLETE, LATEST

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_tag(run_dir: Path, tag: str | None) -> str:
    if tag is None:
        if not (run_dir / LATEST).exists():
            raise UserError(f"{run_dir} has no '{LATEST}' file: it holds no complete checkpoint yet; pass the run "
                            f"folder given as output_dir to train.py, or --tag global_stepN")
        tag = (run_dir / LATEST).read_text().strip()
    if not (run_dir / tag / COMPLETE).exists():
        found = sorted(p.name for p in run_dir.glob("global_step*") if (p / COMPLETE).exists())
        raise UserError(f"{run_dir / tag} is not a complete checkpoint; complete ones: {', '.join(found) or 'none'}")
    return tag


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of checkpoint `tag`, whatever ZeRO stage wrote it."""
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag))
    # No ZeRO: rank 0's model file holds the whole module (in the training dtype).
    states = torch.load(run_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_run(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, dtype: str = "fp32") -> Path:
    """Consolidate checkpoint `tag` (default: the latest) of `run_dir` into the model folder `out_dir`."""
    from astrai_ds.model import Transformer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "model_config.json").exists():
        raise UserError(f"{run_dir} is not a run folder (no model_config.json); pass the output_dir of a training run")
    tag = _resolve_tag(run_dir, tag)
    model_cfg = ModelConfig.load(run_dir / "model_config.json")
    model = Transformer(model_cfg)
    # strict: every parameter of the model must come from the checkpoint, and nothing else may be there
    model.load_state_dict(consolidated_state_dict(run_dir, tag), strict=True)
    model.to(DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"source": f"{run_dir.name}/{tag}"})
    (out_dir / "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
    shutil.copyfile(run_dir / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir


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
    from astrai_ds.model import Transformer

    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).exists():
            raise UserError(f"{model_dir} is not a model folder: {name} is missing; make one with "
                            f"`astrai-ds export --run RUN_DIR --out {model_dir}`")
    model = Transformer(ModelConfig.load(model_dir / "config.json"))
    load_weights(model, model_dir)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), Tokenizer.load(model_dir / "tokenizer.json")
