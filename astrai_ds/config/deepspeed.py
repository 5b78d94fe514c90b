"""DeepSpeed configs stay in DeepSpeed's own JSON format; this module finds them and fills their "auto" values.

Plain DeepSpeed raises on a top-level "auto" and silently drops one inside a sub-section, so every
"auto" is resolved here, from the train config, in one function, and any "auto" left over is an error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from astrai_ds import PROJECT_ROOT
from astrai_ds.config.base import read_json
from astrai_ds.config.train import TrainConfig
from astrai_ds.errors import ConfigError

DS_CONFIG_DIR = PROJECT_ROOT / "ds_configs"


def find_ds_config(name: str | Path) -> Path:
    """`zero3.json` -> ./zero3.json if it exists, else ds_configs/zero3.json of the project."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (DS_CONFIG_DIR / path, DS_CONFIG_DIR / path.name, DS_CONFIG_DIR / f"{path.name}.json"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(f"DeepSpeed config not found: {name} (looked in the working directory and "
                      f"{DS_CONFIG_DIR.relative_to(PROJECT_ROOT)}/; available there: {available})")


def load_ds_config(name: str | Path) -> tuple[dict, Path]:
    path = find_ds_config(name)
    return read_json(path, "DeepSpeed config"), path


def _autos(node, prefix=""):
    """Dotted keys of every value still written "auto"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix[:-1]


# ZeRO settings that pay on an accelerator and cost on a CPU: overlap_comm runs reductions on a side stream
# while backward goes on (a CPU has no streams: the copies stay, the overlap does not), contiguous_gradients
# copies every gradient into one buffer (fragmentation is a GPU allocator's problem). See docs/benchmarks.md
# for what turning them off did on a CPU.
ACCELERATOR_ONLY = ("overlap_comm", "contiguous_gradients")


def resolve_ds_config(ds: dict, train: TrainConfig, world_size: int, *, bf16_supported: bool,
                      accelerator: bool = True, source: str = "DeepSpeed config") -> dict:
    """Fill the "auto" values of a DeepSpeed config from the train config and check the batch arithmetic.

    Explicit numbers in the DeepSpeed config win over the train config (it is DeepSpeed's own format);
    "auto" or a missing key takes the train config's value. `zero_optimization.overlap_comm` and
    `contiguous_gradients` written "auto" are on where `accelerator` (a GPU or other device with streams)
    and off on a CPU. Returns a new dict ready for `deepspeed.initialize`.
    """
    ds = copy.deepcopy(ds)
    dp = world_size  # data-parallel size: no tensor or pipeline parallelism yet

    def fill(key, value):
        if ds.get(key, "auto") == "auto":
            ds[key] = value

    fill("train_micro_batch_size_per_gpu", train.micro_batch_size)
    fill("gradient_accumulation_steps", train.grad_accum_steps)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: '{key}' must be a positive integer or \"auto\", got {json.dumps(value)}")
    fill("train_batch_size", micro * accum * dp)
    if ds["train_batch_size"] != micro * accum * dp:
        raise ConfigError(
            f"{source}: train_batch_size ({ds['train_batch_size']}) must equal train_micro_batch_size_per_gpu "
            f"({micro}) x gradient_accumulation_steps ({accum}) x data-parallel size ({dp}) = {micro * accum * dp}; "
            f"set train_batch_size to \"auto\" or to {micro * accum * dp}, or change the other values"
        )
    fill("gradient_clipping", train.optimizer.grad_clip)

    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and bf16_supported)
    for section, default in (("bf16", use_bf16), ("fp16", False)):
        sub = ds.setdefault(section, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: '{section}' must be a JSON object such as {{\"enabled\": \"auto\"}}")
        if sub.get("enabled", "auto") == "auto":
            sub["enabled"] = default
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError(f"{source}: bf16.enabled and fp16.enabled cannot both be true")
    if train.precision == "fp32" and (ds["bf16"]["enabled"] or ds["fp16"]["enabled"]):
        raise ConfigError(f"{source}: the train config asks for precision \"fp32\" but this DeepSpeed config "
                          "enables bf16/fp16; set them to \"auto\" or false")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3")
    pure_bf16 = [k for k in ("bf16_master_weights_and_grads", "bf16_optimizer_states") if ds["bf16"].get(k)]
    if pure_bf16 and not ds["bf16"]["enabled"]:
        raise ConfigError(f"{source}: bf16.{pure_bf16[0]} keeps weights in bf16, but bf16 is off for this run "
                          f"(train config precision {json.dumps(train.precision)}); set precision to \"bf16\" or "
                          "use a DeepSpeed config without it")
    if pure_bf16 and zero.get("stage", 0) == 0:
        raise ConfigError(f"{source}: bf16.{pure_bf16[0]} needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")
    for key in ACCELERATOR_ONLY:
        if zero.get(key) == "auto":
            zero[key] = accelerator
    if "scheduler" in ds:
        raise ConfigError(f"{source}: remove the 'scheduler' section; the learning-rate schedule comes from "
                          "the train config's 'schedule' section")
    if "optimizer" in ds:
        raise ConfigError(f"{source}: remove the 'optimizer' section; the optimizer is built from the train "
                          "config's 'optimizer' section")
    ds.setdefault("steps_per_print", 2**31 - 1)  # our own logger prints; keep DeepSpeed's step log quiet
    ds.setdefault("wall_clock_breakdown", False)

    left = list(_autos(ds))
    if left:
        raise ConfigError(f"{source}: cannot resolve \"auto\" for {', '.join(left)}; only micro batch, gradient "
                          "accumulation, train batch size, gradient clipping, bf16/fp16.enabled and "
                          "zero_optimization.overlap_comm/contiguous_gradients may be \"auto\"")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")
