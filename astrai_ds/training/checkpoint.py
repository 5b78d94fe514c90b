"""DeepSpeed checkpoints that survive a kill at any moment (the folder layout is in `astrai_ds.run_dir`).

Every rank writes its own shard into `global_stepN/`; only when all ranks are done (a barrier) does
rank 0 mark the folder complete and move `latest` to it with an atomic rename. A run killed while
writing leaves `latest` on the previous, complete checkpoint, and resume never sees the half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from astrai_ds.errors import UserError
from astrai_ds.run_dir import (LATEST, atomic_write, checkpoint_tag, incomplete_checkpoints, list_checkpoints,
                               read_marker, resolve_checkpoint, write_marker)

UNIVERSAL = "universal"  # the run folder's subfolder for checkpoints converted to DeepSpeed's universal format


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def _without_frozen_aliases(engine, active: bool):
    """DeepSpeed's exclude_frozen_parameters drops frozen parameters by their names in named_parameters(), which
    lists a tied weight once: its second name (a tied head's `head.output.weight`, the frozen embedding under LoRA)
    stays in the module's state dict, and a LoRA checkpoint of SmolLM2 held 57 MB of it. While `active`, the state
    dict DeepSpeed saves also leaves out every name that reaches a frozen parameter."""
    if not active:
        yield
        return
    original = engine.module_state_dict

    def frozen(key: str) -> bool:
        try:  # every name of a parameter, a tied one's second name included
            return not engine.module.get_parameter(key).requires_grad
        except AttributeError:  # a buffer
            return False

    def module_state_dict(*args, **kwargs):
        sd = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for key in [k for k in sd if frozen(k)]:
                del sd[key]
        return sd

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # the instance attribute: the class's method shows through again


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict, keep: int,
                    trained_only: bool = False) -> Path:
    """Save a complete checkpoint of every rank, then point `latest` at it and prune old ones. `trained_only`:
    leave the frozen parameters out (LoRA: the base weights are those of the folder the run started from)."""
    output_dir = Path(output_dir)
    tag = checkpoint_tag(step)
    # Each rank's RNG differs (dropout, sampling); keep them all so every rank resumes its own stream.
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    with _without_frozen_aliases(engine, trained_only):
        engine.save_checkpoint(str(output_dir), tag=tag, client_state={**client_state, "rng": rngs},
                               save_latest=False, exclude_frozen_parameters=trained_only)
    dist.barrier()  # every rank's shard is on disk before anything points at it
    if dist.get_rank() == 0:
        write_marker(output_dir / tag, step, dist.get_world_size(), engine.zero_optimization_stage(),
                     getattr(engine, "num_stages", 1))
        atomic_write(output_dir / LATEST, tag)
        if keep > 0:
            prune_checkpoints(output_dir, keep)
        # A run resumed through a universal checkpoint now has one of its own: the converted copy is not needed.
        shutil.rmtree(output_dir / UNIVERSAL, ignore_errors=True)
    dist.barrier()
    return output_dir / tag


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    latest = (output_dir / LATEST).read_text().strip()
    for _, path in list_checkpoints(output_dir)[:-keep]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def remove_incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Delete checkpoint folders that a killed run left without a marker (never a complete one); only call
    this while holding the run's lock, so that no other run is writing one."""
    removed = []
    for path in incomplete_checkpoints(output_dir):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def find_checkpoint(resume: str, output_dir: str | Path) -> tuple[Path, str, list[str]] | None:
    """Where to resume from: (load_dir, tag, notes), or None to start fresh.

    resume "auto": the checkpoint `latest` in output_dir names, if any, falling back to the newest older one
    that is intact when it is damaged (notes say so); "none": start fresh; otherwise a checkpoint folder
    (`run/global_step200`) or a run folder holding `latest`, which must be intact.
    """
    if resume == "none":
        return None
    output_dir = Path(output_dir)
    if resume == "auto":
        if not (output_dir / LATEST).exists():
            return None
        tag, notes = resolve_checkpoint(output_dir, fall_back=True)
        return output_dir, tag, notes
    path = Path(resume)
    if (path / LATEST).exists():
        return path, *resolve_checkpoint(path)
    if read_marker(path) is not None:
        return path.parent, *resolve_checkpoint(path.parent, path.name)
    raise UserError(f"resume: {resume} is not a complete checkpoint folder (global_stepN with a COMPLETE "
                    f"marker) nor a run folder with a '{LATEST}' file; use \"auto\", \"none\" or such a path")


def _read_json(path: Path):
    """A run file's content; None when it is missing, or was left empty or cut short by a kill during a
    non-atomic write (it is rewritten from this run's configs)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_resumable(load_dir: Path, tag: str, world_size: int, zero_stage: int, model_cfg: dict,
                    pipeline_stages: int = 1, nvme: bool = False, optimizer: str = "adamw") -> bool:
    """Stop before anything is written when the checkpoint cannot resume in this run: another model shape,
    ZeRO stage, number of pipeline stages, optimizer (`optimizer`: this run's optimizer.type), optimizer
    offloaded to NVMe or not (`nvme`: this run's), or number of ranks without ZeRO, with NVMe offload or with
    Muon (whose momentum DeepSpeed's universal checkpoint does not convert). Returns True when it resumes only
    through a universal checkpoint (`to_universal`): ZeRO-1/2/3 written by another number of ranks."""
    where = load_dir / tag
    saved_model = load_dir / "model_config.json"
    if _read_json(saved_model) not in (None, model_cfg):
        raise UserError(f"cannot resume from {where}: it was trained with the model config in {saved_model}, which "
                        f"differs from this run's; use the same model config, another output_dir, or resume \"none\"")
    marker = read_marker(where) or {}
    saved_world, saved_stage = marker.get("world_size"), marker.get("zero_stage")
    differs = []
    if saved_stage is not None and saved_stage != zero_stage:
        differs.append(f"ZeRO stage {saved_stage}, this run {zero_stage}")
    saved_train = _read_json(load_dir / "train_config.json") or {}
    saved_optimizer = (saved_train.get("optimizer") or {}).get("type", "adamw")
    if saved_optimizer != optimizer:
        differs.append(f"optimizer.type {saved_optimizer}, this run {optimizer}")
    saved_stages = marker.get("pipeline_stages", 1)
    if saved_stages != pipeline_stages:  # a pipeline checkpoint holds its weights per layer, a plain one whole
        differs.append(f"{saved_stages} pipeline stage{'s' * (saved_stages > 1)}, this run {pipeline_stages}")
    # DeepSpeed copies an NVMe-offloaded optimizer's swap files into the checkpoint, one folder per rank, and
    # loads them back only into the same offload on the same ranks.
    saved_nvme = (where / "offloaded_tensors").is_dir()
    if saved_nvme != nvme:
        differs.append(f"the optimizer {'' if saved_nvme else 'not '}offloaded to NVMe, this run "
                       f"{'' if nvme else 'not '}offloading it there")
    other_world = saved_world is not None and saved_world != world_size
    # ZeRO's optimizer files convert to DeepSpeed's universal checkpoint, which loads on any number of ranks.
    # Without ZeRO there are none, and even ZeRO-0's bf16 optimizer keeps its master weights per rank.
    if other_world and (not 1 <= zero_stage <= 3 or pipeline_stages > 1 or saved_nvme or nvme
                        or optimizer == "muon"):
        differs.append(f"{saved_world} ranks, this run {world_size}")
    if differs:
        raise UserError(
            f"cannot resume from {where}: it was written with {'; '.join(differs)}. Resume with the same ZeRO stage "
            f"and offload, optimizer, pipeline stages and number of ranks (the run's ds_config.json and "
            f"train_config.json have the ones it used), or export it (`astrai-ds export --run {load_dir} --out "
            f"MODEL_DIR`) and start a new run from it with stage.init_from (a fresh optimizer), or set resume to "
            f"\"none\" with another output_dir")
    return other_world


def to_universal(load_dir: Path, tag: str, output_dir: Path) -> tuple[Path, list[str]]:
    """Convert checkpoint `load_dir/tag` to DeepSpeed's universal format in `output_dir/universal/tag`, once (a
    conversion already there is used again), and return (the folder to load `tag` from, notes). Rank 0 only.

    DeepSpeed's `ds_to_universal` writes each parameter's fp32 weights and Adam moments whole, so any number of
    ranks can load them (`"checkpoint": {"load_universal": true}`); `--inject_missing_state` adds the version
    record that non-Megatron models do not save. The conversion goes to a temporary folder, renamed when done."""
    import subprocess
    import sys

    universal = Path(output_dir) / UNIVERSAL
    target = universal / tag
    marker = read_marker(target)
    if marker is not None:
        return universal, [f"using {target}, converted before"]
    source = read_marker(load_dir / tag) or {}
    tmp = universal / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    universal.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(load_dir / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise UserError(f"cannot convert {load_dir / tag} to a universal checkpoint for this number of ranks "
                        f"(`{' '.join(cmd[1:])}` exited {proc.returncode}):\n{tail}\nResume on the "
                        f"{source.get('world_size', 'same number of')} ranks that wrote it instead")
    write_marker(tmp, source.get("step", 0), source.get("world_size", 0), source.get("zero_stage", 0))
    tmp.rename(target)
    return universal, [f"converted {load_dir / tag} (written by {source.get('world_size')} ranks) to a universal "
                       f"checkpoint in {target}, which loads on any number of ranks"]


def repair_zero3_universal_load(engine, universal_dir: Path, tag: str) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`,
    DeepSpeed 0.19), which the resumed run would otherwise carry as a drift from the run it continues:

    - it gives every param group the first group's settings, so the norms' group would get the matrices' weight
      decay: each group's own settings, kept in the converted folder, are copied back by position (the groups are
      built in the same order in every run);
    - it puts one `step` tensor into every group's Adam state, and a fused Adam step adds 1 to it once per group,
      so later groups would use a later step's bias correction: each group gets its own copy.
    """
    path = Path(universal_dir) / tag / "zero" / "optimizer_state.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(saved) != len(optimizer.param_groups):
        raise UserError(f"{path} has {len(saved)} optimizer groups and this run {len(optimizer.param_groups)}; "
                        f"resume on the number of ranks that wrote the checkpoint")
    for group, settings in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in settings.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def repair_nvme_optimizer_load(engine, load_dir: Path, tag: str) -> None:
    """Complete DeepSpeed's resume of a ZeRO-3 optimizer offloaded to NVMe (DeepSpeed 0.19). For such an optimizer
    `load_checkpoint` skips the ZeRO checkpoint files and only copies the swap files back, and the optimizer's state
    is made lazily, at its first step. So the run would go on with fresh Adam moments and step counts, the first
    step's learning rate of the fresh schedule, and the initial weights for every sub-group smaller than one aio
    block (1 MiB), which DeepSpeed keeps in host memory rather than swapping. All but the swapped tensors are in
    this rank's `*_optim_states.pt`; the param groups' settings (the learning rate) are copied back, and:

    - a swapped sub-group gets its step count and moment tensors registered, so that the swapper reads the moments
      back from the swap files that came with the checkpoint (one sub-group at a time, as a step does);
    - an in-memory sub-group gets its fp32 weights, moments and step count from the file, and its model weights
      from those fp32 weights."""
    optimizer = engine.optimizer
    path = engine._get_zero_ckpt_name(str(load_dir), tag)
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    state, fp32_saved = saved["optimizer_state_dict"]["state"], saved["fp32_flat_groups"]
    # The saved state's indices run over the param groups in order, each group's sub-groups in order.
    order = [i for g in range(len(optimizer.optimizer.param_groups)) for i in range(len(optimizer.fp16_groups))
             if optimizer.sub_group_to_group_id[i] == g]
    # The groups' settings: the learning rate of the step that follows is the one the schedule set last.
    for group, settings in zip(optimizer.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"]):
        group.update({key: value for key, value in settings.items() if key != "params"})
    optimizer.checkpoint_event_prologue()
    timers = set()
    for index, sub_group in enumerate(order):
        fp32 = optimizer.fp32_partitioned_groups_flat[sub_group]
        if optimizer._swappable_optimizer_subgroup(sub_group):
            numel = int(optimizer.fp16_partitioned_groups_flat_numel[sub_group])
            optimizer.optimizer.state[fp32] = {
                key: torch.zeros(numel, dtype=fp32.dtype) if torch.is_tensor(value) else value
                for key, value in state[index].items()}
            optimizer._prepare_sub_group(sub_group, timers)  # reads the weights and moments from the swap files
            optimizer._release_sub_group(sub_group, timers)
            continue
        with torch.no_grad():
            fp32.copy_(fp32_saved[sub_group])
        optimizer.optimizer.state[fp32] = {key: value.clone() if torch.is_tensor(value) else value
                                           for key, value in state[index].items()}
        optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)  # the model's weights, as a step does
    optimizer.checkpoint_event_epilogue()
