"""Export a DeepSpeed run to a model folder that loads without DeepSpeed, and in `transformers` as
LlamaForCausalLM (Qwen3ForCausalLM with QK-norm): the format is model/io.py's `save_model_folder`.
ZeRO-1/2/3 checkpoints keep the fp32 master weights split across ranks' optimizer files; DeepSpeed's
zero_to_fp32 helpers gather them into one state dict. Without ZeRO the module weights are read directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from astrai_ds.config.model import ModelConfig
from astrai_ds.data.sources import check_out_dir
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import UserError
from astrai_ds.model.io import MODEL_FILES, save_model_folder
from astrai_ds.run_dir import output_dir_holder, read_marker, resolve_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of checkpoint `tag`, whatever ZeRO stage or pipeline stages wrote it."""
    marker = read_marker(run_dir / tag) or {}
    if marker.get("pipeline_stages", 1) > 1:
        return _pipeline_state_dict(run_dir, tag)
    stage = marker.get("zero_stage")
    if stage is None:  # a checkpoint from before markers recorded it: the run's config tells
        stage = json.loads((run_dir / "ds_config.json").read_text()).get("zero_optimization", {}).get("stage", 0)
    if (run_dir / tag / "offloaded_tensors").is_dir():
        # DeepSpeed keeps such a run's fp32 weights in the swap files it copies there, and its ZeRO files hold
        # empty placeholders for them, which zero_to_fp32 cannot consolidate.
        raise UserError(f"{run_dir / tag}: this run offloaded its optimizer to NVMe, and export does not read the "
                        f"fp32 weights from its swap files yet; such a checkpoint can only be resumed")
    if int(stage) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag))
    # No ZeRO: rank 0's model file holds the whole module (in the training dtype).
    states = torch.load(run_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _pipeline_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """A pipeline run saves each layer's module weights (in the training dtype) in a file of its own,
    layer_NN-model_states.pt; their keys, behind the layer's prefix, are the plain model's names."""
    from astrai_ds.model.pipeline import plain_state

    cfg = ModelConfig.load(run_dir / "model_config.json")
    layers = {}
    for idx in range(cfg.n_layers + 3):
        files = sorted((run_dir / tag).glob(f"layer_{idx:02d}-*model_states.pt"))
        if files:  # a tied output layer has no file: it is the embedding
            layers[idx] = {k: v.float() for k, v in torch.load(files[0], map_location="cpu", weights_only=True).items()}
    return plain_state(layers, cfg)


def _check_model_out_dir(out_dir: Path) -> None:
    """Refuse `out_dir` when it cannot be a folder or is a non-empty folder that is not a model folder (one that
    holds model.safetensors, or only model folder files): export overwrites a model's files, nothing else."""
    check_out_dir(out_dir, "the model folder")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and "model.safetensors" not in entries and not set(entries) <= set(MODEL_FILES):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{out_dir} is not empty ({shown}) and is not a model folder; give --out a new or empty "
                        f"folder, or a model folder to overwrite")


def _checked_run(run_dir: Path, tag: str | None) -> str:
    """The checkpoint tag to export from `run_dir` (default: the latest), once the folder is a run nobody trains."""
    if not (run_dir / "model_config.json").exists():
        raise UserError(f"{run_dir} is not a run folder (no model_config.json); pass the output_dir of a training run")
    holder = output_dir_holder(run_dir)
    if holder is not None:
        raise UserError(f"{run_dir} is still being trained into ({holder}); wait for that run to end, then export "
                        f"(its last checkpoint may not be written yet)")
    tag, _ = resolve_checkpoint(run_dir, tag)
    return tag


def run_model(run_dir: str | Path, tag: str | None = None):
    """(model in float32, tokenizer) of checkpoint `tag` (default: the latest) of `run_dir`."""
    from astrai_ds.model import Transformer

    run_dir = Path(run_dir)
    tag = _checked_run(run_dir, tag)
    model = Transformer(ModelConfig.load(run_dir / "model_config.json"))
    # strict: every parameter of the model must come from the checkpoint, and nothing else may be there
    model.load_state_dict(consolidated_state_dict(run_dir, tag), strict=True)
    return model.float().eval(), Tokenizer.load(run_dir / "tokenizer.json")


def export_run(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, dtype: str = "fp32") -> Path:
    """Consolidate checkpoint `tag` (default: the latest) of `run_dir` into the model folder `out_dir`: a new or
    empty folder, or a model folder whose files are overwritten. Every file it writes follows the umask."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _checked_run(run_dir, tag)
    _check_model_out_dir(out_dir)
    model, tokenizer = run_model(run_dir, tag)
    model.to(DTYPES[dtype])
    return save_model_folder(model, tokenizer, out_dir)
