"""Export a DeepSpeed run to a model folder that loads without DeepSpeed, and in `transformers` as
LlamaForCausalLM (Qwen3ForCausalLM with QK-norm): the format is model/io.py's `save_model_folder`.
ZeRO-1/2/3 checkpoints keep the fp32 master weights split across ranks' optimizer files; DeepSpeed's
zero_to_fp32 helpers gather them into one state dict (with the optimizer offloaded to NVMe, the swapped parts are
read from the swap files the checkpoint holds). Without ZeRO the module weights are read directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from astrai_ds.config.base import from_dict
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import LoraConfig
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
        return _nvme_state_dict(run_dir, tag)
    if int(stage) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag))
    # No ZeRO: rank 0's model file holds the whole module (in the training dtype).
    states = torch.load(run_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _sub_group_numels(param_shapes: list[dict], world_size: int, sub_group_size: int) -> list[int]:
    """The length of each of a rank's ZeRO-3 sub-groups, in order: each parameter group's partitions (a
    parameter's is ceil(numel / world_size) long) cut where a sub-group reaches `sub_group_size`, as DeepSpeed's
    `DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups` cuts them."""
    out = []
    for group in param_shapes:
        numels = [math.ceil(math.prod(shape) / world_size) for shape in group.values()]
        if sub_group_size >= sum(numels):
            out.append(sum(numels))
            continue
        size = 0
        for i, n in enumerate(numels):
            size += n
            if size >= sub_group_size or i == len(numels) - 1:
                out.append(size)
                size = 0
    return out


def _nvme_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO-3 checkpoint whose optimizer was offloaded to NVMe. DeepSpeed's ZeRO files
    hold an empty placeholder for each sub-group it swaps; the sub-group's fp32 weights are the first elements of
    the swap file `offloaded_tensors/rank<NN>/<ds_id>.tensor.swp` that the checkpoint copied (the file is padded to
    the I/O alignment, and its optimizer states lie beside it as `exp_avg-<ds_id>...`). Each placeholder is read
    from its file, then DeepSpeed's zero_to_fp32 consolidates as for any ZeRO-3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import (_get_fp32_state_dict_from_zero3_checkpoint, get_model_state_files,
                                              get_optim_files, parse_model_states, parse_optim_states,
                                              to_torch_tensor)

    ckpt = run_dir / tag
    model_states = parse_model_states(get_model_state_files(str(ckpt)))
    stage, world_size, flat_groups, _ = parse_optim_states(get_optim_files(str(ckpt)), str(ckpt))
    if stage != 3:
        raise UserError(f"{ckpt}: swap files of an optimizer offloaded to NVMe beside a ZeRO-{stage} checkpoint; "
                        f"export reads them for ZeRO-3 only")
    zero = json.loads((run_dir / "ds_config.json").read_text()).get("zero_optimization", {})
    sizes = _sub_group_numels(model_states[0].param_shapes, world_size, int(zero.get("sub_group_size", 10**9)))
    for rank, groups in enumerate(flat_groups):
        folder = ckpt / "offloaded_tensors" / f"rank{rank:0>2d}"
        if len(groups) != len(sizes):
            raise UserError(f"{ckpt}: rank {rank} saved {len(groups)} optimizer sub-groups where the run's model and "
                            f"sub_group_size make {len(sizes)}; the checkpoint does not match its run's ds_config.json")
        for i, (flat, numel) in enumerate(zip(groups, sizes)):
            if flat.numel() == numel:
                continue
            path = folder / f"{getattr(flat, 'ds_id', None)}.tensor.swp"
            need = numel * flat.element_size()
            if flat.numel() != 0 or not path.is_file() or path.stat().st_size < need:
                raise UserError(f"{ckpt}: the fp32 weights of rank {rank}'s optimizer sub-group {i} ({numel} values) "
                                f"are neither in its ZeRO file nor in {path}"
                                f"{' (too short)' if path.is_file() else ''}; the checkpoint is incomplete: export "
                                f"another one (--tag)")
            groups[i] = torch.from_file(str(path), shared=False, size=numel, dtype=flat.dtype)
    state = _get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, model_states, False)
    return dict(to_torch_tensor(state))


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


def write_model_folder(out_dir: Path, write) -> Path:
    """Make the model folder `out_dir` with `write(folder)`, which writes its files into a hidden folder beside it
    (`.NAME.part`): that folder becomes `out_dir`, or, where `out_dir` exists, each of its files replaces the one of
    the same name there (other files are kept). An interrupted or failed write leaves `out_dir` as it was and no
    half-written file."""
    out_dir = Path(out_dir)
    tmp = out_dir.resolve().with_name(f".{out_dir.resolve().name}.part")  # resolved: `--out .` has a name too
    if tmp.exists():  # what an earlier, killed write left
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out_dir.exists():
            for path in sorted(tmp.iterdir()):
                os.replace(path, out_dir / path.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
    """(model in float32, tokenizer) of checkpoint `tag` (default: the latest) of `run_dir`. A LoRA run's
    checkpoints hold the adapters alone: they are folded into the base weights the run started from."""
    from astrai_ds.model import Transformer

    run_dir = Path(run_dir)
    tag = _checked_run(run_dir, tag)
    model = Transformer(ModelConfig.load(run_dir / "model_config.json"))
    state = consolidated_state_dict(run_dir, tag)
    train_cfg, lora = _run_lora(run_dir)
    if lora.enabled:
        from astrai_ds.model.lora import merged_state_dict

        state = merged_state_dict({**_base_state(model, train_cfg), **_adapters(state)}, lora.scale)
    # strict: every parameter of the model must come from the checkpoint, and nothing else may be there
    model.load_state_dict(state, strict=True)
    return model.float().eval(), Tokenizer.load(run_dir / "tokenizer.json")


def _run_lora(run_dir: Path) -> tuple[dict, LoraConfig]:
    """(the run's train config as saved, its lora section); a run from before LoRA has none (r 0)."""
    path = run_dir / "train_config.json"
    train_cfg = json.loads(path.read_text()) if path.exists() else {}
    return train_cfg, from_dict(LoraConfig, train_cfg.get("lora") or {}, str(path), "lora.")


def _adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters (DeepSpeed's plain engine also keeps the tied head's alias of the frozen
    embedding, which nothing trained)."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def _base_state(model, train_cfg: dict) -> dict[str, torch.Tensor]:
    """The frozen weights a LoRA run trained its adapters on, in fp32: the folder of stage.init_from, or the
    seed's initialisation (what `training.engine.build_model` drew)."""
    from astrai_ds.model import Transformer
    from astrai_ds.model.io import folder_state

    init_from = (train_cfg.get("stage") or {}).get("init_from")
    if init_from:
        return {k: v.float() for k, v in folder_state(model.cfg, init_from).items()}
    torch.manual_seed(train_cfg.get("seed", 0))
    return {k: v.float() for k, v in Transformer(model.cfg).state_dict().items()}


def export_run(run_dir: str | Path, out_dir: str | Path, tag: str | None = None, dtype: str = "fp32") -> Path:
    """Consolidate checkpoint `tag` (default: the latest) of `run_dir` into the model folder `out_dir`: a new or
    empty folder, or a model folder whose files are overwritten. Every file it writes follows the umask."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _checked_run(run_dir, tag)
    _check_model_out_dir(out_dir)
    model, tokenizer = run_model(run_dir, tag)
    model.to(DTYPES[dtype])
    return write_model_folder(out_dir, lambda folder: save_model_folder(model, tokenizer, folder))


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_adapter(run_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """The adapters of LoRA run `run_dir` alone, in PEFT's layout: `adapter_model.safetensors` (each adapted layer's
    `lora_A` and `lora_B` under its Hugging Face name) and `adapter_config.json`, which names the base model folder
    the run started from; the `peft` library loads them onto that folder's model."""
    from safetensors.torch import save_file

    from astrai_ds.model import hf_llama_name

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tag = _checked_run(run_dir, tag)
    train_cfg, lora = _run_lora(run_dir)
    if not lora.enabled:
        raise UserError(f"--adapter: {run_dir} was not trained with LoRA (its lora.r is 0), so it has no adapter; "
                        f"export it without --adapter")
    base = (train_cfg.get("stage") or {}).get("init_from")
    if not base:
        raise UserError(f"--adapter: {run_dir} trained its adapters on a randomly initialised model, which has no "
                        f"folder for an adapter to name; export it without --adapter (merged)")
    check_out_dir(out_dir, "the adapter folder")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not set(entries) <= set(ADAPTER_FILES):
        raise UserError(f"{out_dir} is not empty and is not an adapter folder; give --out a new or empty folder")
    tensors, modules = {}, []
    for key, value in sorted(_adapters(consolidated_state_dict(run_dir, tag)).items()):
        layer, _, kind = key.rpartition(".")  # layers.0.attention.wq, lora_A
        hf_layer = hf_llama_name(f"{layer}.weight").removesuffix(".weight")  # model.layers.0.self_attn.q_proj
        tensors[f"base_model.model.{hf_layer}.{kind}.weight"] = value.float().contiguous()
        if kind == "lora_A":
            modules.append(hf_layer)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
              "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_model_folder(out_dir, write)
