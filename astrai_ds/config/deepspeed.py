"""DeepSpeed configs stay in DeepSpeed's own JSON format; this module finds them, checks them against
DeepSpeed's own config model and fills their "auto" values.

Plain DeepSpeed ignores a top-level key it does not know (a misspelled "zero_optimisation" trains without ZeRO),
answers a mistake inside a section with a pydantic traceback, raises on a top-level "auto" and silently drops
one inside a section. So `load_ds_config` checks the file before any process group or model exists, with one
line per mistake, and `resolve_ds_config` fills every "auto" from the train config; any other "auto" is an error.
"""

from __future__ import annotations

import copy
import functools
import json
import typing
from pathlib import Path

from astrai_ds import PROJECT_ROOT
from astrai_ds.config.base import YAML_SUFFIXES, convert_value, did_you_mean, read_json
from astrai_ds.config.train import TrainConfig
from astrai_ds.errors import ConfigError

DS_CONFIG_DIR = PROJECT_ROOT / "ds_configs"

# ZeRO settings that pay on an accelerator and cost on a CPU: overlap_comm runs reductions on a side stream
# while backward goes on (a CPU has no streams: the copies stay, the overlap does not), contiguous_gradients
# copies every gradient into one buffer (fragmentation is a GPU allocator's problem). See docs/benchmarks.md
# for what turning them off did on a CPU.
ACCELERATOR_ONLY = ("overlap_comm", "contiguous_gradients")
MICRO_BATCH, GRAD_ACCUM = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
TRAIN_BATCH = "train_batch_size"
BATCH_KEYS = (MICRO_BATCH, GRAD_ACCUM, TRAIN_BATCH)
# The keys that may be written "auto": resolve_ds_config fills each from the train config or the device.
# ZeRO-Infinity's swap folders: "auto" is a folder in the run's output_dir (NVME_DIR), removed when training ends.
OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")
NVME_DIR = "nvme_offload"
AUTO_KEYS = (*BATCH_KEYS, "gradient_clipping", "bf16.enabled", "fp16.enabled",
             *(f"zero_optimization.{key}" for key in ACCELERATOR_ONLY),
             *(f"zero_optimization.{section}.nvme_path" for section in OFFLOAD_SECTIONS))
# The batch sizes DeepSpeed's parser is given in place of a file's while checking it: the real ones depend on the
# world size, which is known only once the process group exists, and resolve_ds_config checks them then.
_BATCH_PROBE = {MICRO_BATCH: 1, GRAD_ACCUM: 1}
# The only keys listed by hand: deepspeed.initialize reads both to build a device mesh, and DeepSpeedConfig reads
# sequence_parallel_size only once a process group exists, so a parse before that cannot see them read.
MESH_KEYS = frozenset({"data_parallel_size", "sequence_parallel_size"})


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
    """Find and read a DeepSpeed config, and check it against DeepSpeed's own config model."""
    path = find_ds_config(name)
    if path.suffix.lower() in YAML_SUFFIXES:
        raise ConfigError(f"{path}: a DeepSpeed config is JSON (DeepSpeed's own format); write it as a .json file")
    ds = read_json(path, "DeepSpeed config")
    check_ds_config(ds, str(path))
    return ds, path


# --- checking a file against DeepSpeed's own config model

def check_ds_config(ds: dict, source: str = "DeepSpeed config") -> None:
    """Check a DeepSpeed config the way the installed DeepSpeed reads it, and report a mistake in one line that
    names the file and the dotted key: a top-level key DeepSpeed does not read (it would ignore it), an "auto"
    that cannot be filled, a section the train config owns, a top-level value of another type than DeepSpeed's
    default, an error from DeepSpeed's pydantic model of a section, and last DeepSpeed's checks across sections."""
    known = deepspeed_keys()
    for key in ds:
        if key not in known:
            raise ConfigError(f"{source}: {_unknown_key(key, did_you_mean(key, known))}")
    check_no_auto_left(ds, source, allowed=AUTO_KEYS)
    reject_sections_we_build(ds, source)
    defaults = _scalar_defaults()
    for key, value in ds.items():
        if key in defaults and value != "auto":
            convert_value(value, type(defaults[key]), key, source)
    _parse_with_deepspeed(ds, source)


@functools.cache
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads, recorded while its `DeepSpeedConfig` parses a minimal
    config: it looks each key up by name (`get`, `[]`, `in`) and never sees the others. Recorded rather than
    listed, so that the list follows DeepSpeed's version (keys it has removed included: it rejects those itself)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _KeyRecorder(_BATCH_PROBE)
    DeepSpeedConfig(probe)
    return frozenset(probe.looked_up) | MESH_KEYS


class _KeyRecorder(dict):
    """A dict that remembers every key looked up in it."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.looked_up: set[str] = set()

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self):  # so that `key in config.keys()` is recorded too
        return self

    def __copy__(self):  # DeepSpeedConfig parses a shallow copy
        return self


@functools.cache
def _scalar_defaults() -> dict:
    """Top-level key -> DeepSpeed's default, where that is a bool, a number or a string. DeepSpeed's constants
    module pairs each key NAME with NAME_DEFAULT, and reads these values without checking their type."""
    from deepspeed.runtime import constants

    known = deepspeed_keys()
    pairs = ((value, getattr(constants, f"{name}_DEFAULT", None)) for name, value in vars(constants).items()
             if isinstance(value, str) and value in known)
    return {key: default for key, default in pairs if isinstance(default, (bool, int, float, str))}


def _parse_with_deepspeed(ds: dict, source: str) -> None:
    """Parse `ds` with DeepSpeed's own code: each key alone first, so that an error is known to be that key's, then
    the whole config for DeepSpeed's checks across sections."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    deepspeed_errors = (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError, AttributeError)
    # resolve_ds_config fills the "auto"s (DeepSpeed's pydantic models drop them the same way) and checks the
    # batch sizes against the world size
    ds = {key: value for key, value in _without_autos(ds).items() if key not in BATCH_KEYS}
    for key, value in ds.items():
        try:
            # _initialize_params is DeepSpeedConfig's parse without the world size and the checks across sections
            DeepSpeedConfig.__new__(DeepSpeedConfig)._initialize_params({key: value})
        except ValidationError as e:
            raise ConfigError(f"{source}: {_pydantic_problems(e, key)}") from None
        except deepspeed_errors as e:
            if isinstance(e, TypeError) and not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{key}' must be a JSON object (a section), "
                                  f"got {json.dumps(value)}") from None
            raise ConfigError(f"{source}: key '{key}': {e}") from None
    try:
        DeepSpeedConfig({**ds, **_BATCH_PROBE})
    except ValidationError as e:
        raise ConfigError(f"{source}: {_pydantic_problems(e)}") from None
    except deepspeed_errors as e:
        raise ConfigError(f"{source}: DeepSpeed rejects this config: {e}") from None


def _without_autos(node):
    if not isinstance(node, dict):
        return node
    return {key: _without_autos(value) for key, value in node.items() if value != "auto"}


def _pydantic_problems(error, section: str | None = None) -> str:
    """A pydantic ValidationError from the model of top-level key `section`, as one line of dotted keys."""
    problems = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        # DeepSpeed's monitor model is given the top-level sections themselves: its error paths start with one
        path = loc if section is None or loc[:1] == (section,) else (section, *loc)
        if item["type"] == "extra_forbidden":
            parent = _dotted(path[:-1]) + "." if len(path) > 1 else ""
            hint = did_you_mean(str(loc[-1]), _model_keys(error.title, loc[:-1]), parent)
            problems.append(_unknown_key(_dotted(path), hint))
            continue
        msg = item["msg"].removeprefix("Value error, ")
        problem = f"must be{msg[len('Input should be'):]}" if msg.startswith("Input should be") else f"is wrong: {msg}"
        problems.append(f"key '{_dotted(path)}' {problem}, got {json.dumps(item['input'], default=str)}")
    return "; ".join(problems)


def _unknown_key(key: str, hint: str) -> str:
    from deepspeed import __version__

    return f"unknown key '{key}'{hint}; DeepSpeed {__version__} has no such setting: correct or remove it"


def _dotted(path: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def _model_keys(title: str, path: tuple) -> list[str]:
    """The keys that DeepSpeed's pydantic model named `title` accepts at `path` inside it, aliases included."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pydantic import BaseModel

    model = next((m for m in _subclasses(DeepSpeedConfigModel) if m.__name__ == title), None)
    for part in path:
        fields = model.model_fields if model else {}
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        types_ = (field.annotation, *typing.get_args(field.annotation)) if field else ()
        model = next((t for t in types_ if isinstance(t, type) and issubclass(t, BaseModel)), None)
    if model is None:
        return []
    return [key for name, field in model.model_fields.items() for key in (name, field.alias) if key]


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


# --- filling "auto" from the train config

def resolve_ds_config(ds: dict, train: TrainConfig, world_size: int, *, bf16_supported: bool,
                      accelerator: bool = True, source: str = "DeepSpeed config",
                      train_source: str = "the train config") -> dict:
    """Fill the "auto" values of a DeepSpeed config from the train config and check the batch arithmetic.

    Explicit numbers in the DeepSpeed config win over the train config (it is DeepSpeed's own format);
    "auto" or a missing key takes the train config's value. `zero_optimization.overlap_comm` and
    `contiguous_gradients` written "auto" are on where `accelerator` (a GPU or other device with streams)
    and off on a CPU. Returns a new dict ready for `deepspeed.initialize`. `source` and `train_source` name the two
    files in errors.
    """
    ds = copy.deepcopy(ds)
    dp = data_parallel_size(train, world_size)
    _fill_batch_sizes(ds, train, dp, source)
    _fill(ds, "gradient_clipping", train.optimizer.grad_clip)
    _fill_precision(ds, train, bf16_supported, source)
    _fill_zero(ds, accelerator, train.output_dir, source)
    _check_pipeline(ds, train, source)
    _check_pure_bf16(ds, train, source)
    _fit_muon(ds, train, source, train_source)
    reject_sections_we_build(ds, source)
    ds.setdefault("steps_per_print", 2**31 - 1)  # our own logger prints; keep DeepSpeed's step log quiet
    ds.setdefault("wall_clock_breakdown", False)
    check_no_auto_left(ds, source)
    return ds


def data_parallel_size(train: TrainConfig, world_size: int) -> int:
    """The number of model replicas: the ranks divided by the pipeline stages (each replica spans all stages)."""
    stages = train.parallel.pipeline_stages
    if world_size % stages:
        raise ConfigError(f"parallel.pipeline_stages {stages} does not divide the {world_size} ranks of this launch; "
                          f"launch a multiple of {stages} ranks or change pipeline_stages")
    return world_size // stages


def _fit_muon(ds: dict, train: TrainConfig, source: str, train_source: str) -> None:
    """optimizer.type muon: DeepSpeed's Muon steps on the ranks (no offloaded optimizer), and its ZeRO-3 reduces
    gradients without reduce-scatter (it orthogonalises each matrix's whole gradient): a ZeRO-3 config that does not
    say otherwise gets `reduce_scatter: false`."""
    if train.optimizer.type != "muon":
        return
    if offloads_optimizer(ds):
        raise ConfigError(f"{source}: offload_optimizer does not combine with optimizer.type muon (DeepSpeed's "
                          f"Muon steps on the ranks): use a config without offload_optimizer, e.g. zero2.json or "
                          f"zero3.json, or optimizer.type adamw")
    if train.optimizer.grad_clip > 0:
        raise ConfigError(f"{train_source}: optimizer.grad_clip is {train.optimizer.grad_clip:g}, but with "
                          f"optimizer.type muon DeepSpeed (0.19) clips Muon's orthogonalised update by its own norm, "
                          f"not the gradient, which shrinks every step by a factor that grows with the model: set "
                          f"optimizer.grad_clip to 0 (Muon's update does not depend on the gradient's scale)")
    zero = ds["zero_optimization"]
    if zero.get("stage", 0) == 3:
        if ds["gradient_accumulation_steps"] > 1:
            raise ConfigError(f"{source}: ZeRO-3 with optimizer.type muon and grad_accum_steps "
                              f"{ds['gradient_accumulation_steps']}: DeepSpeed (0.19) runs Muon's update on each "
                              f"micro-batch's gradient under ZeRO-3, not on the accumulated one; use grad_accum_steps "
                              f"1 (a larger micro_batch_size), or ZeRO-2 (zero2.json)")
        if zero.get("reduce_scatter") is True:
            raise ConfigError(f"{source}: zero_optimization.reduce_scatter true does not combine with "
                              f"optimizer.type muon under ZeRO-3 (DeepSpeed's Muon needs each matrix's whole "
                              f"gradient): remove it or set it to false")
        zero["reduce_scatter"] = False


def _check_pipeline(ds: dict, train: TrainConfig, source: str) -> None:
    """DeepSpeed's pipeline engine runs with ZeRO stage 0 or 1 only (it asserts); say so in our terms."""
    stage = ds["zero_optimization"].get("stage", 0)
    if train.parallel.pipeline_stages > 1 and stage >= 2:
        raise ConfigError(f"{source}: ZeRO stage {stage} does not combine with pipeline stages "
                          f"(parallel.pipeline_stages {train.parallel.pipeline_stages}): DeepSpeed's pipeline engine "
                          f"shards the optimizer states at most (ZeRO-1). Use --ds_config pipeline.json (ZeRO-1), or "
                          f"set parallel.pipeline_stages to 1 to shard with ZeRO-{stage}")


def _fill(section: dict, key: str, value) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def _fill_batch_sizes(ds: dict, train: TrainConfig, dp: int, source: str) -> None:
    """Micro batch and accumulation from the train config; the train batch size follows from them."""
    _fill(ds, MICRO_BATCH, train.micro_batch_size)
    _fill(ds, GRAD_ACCUM, train.grad_accum_steps)
    for key in (MICRO_BATCH, GRAD_ACCUM):
        value = ds[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: '{key}' must be a positive integer or \"auto\", got {json.dumps(value)}")
    _fill(ds, TRAIN_BATCH, ds[MICRO_BATCH] * ds[GRAD_ACCUM] * dp)
    check_batch_size(ds, dp, source)


def check_batch_size(ds: dict, dp: int, source: str) -> None:
    """train_batch_size = micro batch x gradient accumulation x data-parallel size, or an error showing all four."""
    micro, accum, total = ds[MICRO_BATCH], ds[GRAD_ACCUM], ds[TRAIN_BATCH]
    if total != micro * accum * dp:
        raise ConfigError(
            f"{source}: train_batch_size ({total}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x data-parallel size ({dp}) = {micro * accum * dp}; "
            f"set train_batch_size to \"auto\" or to {micro * accum * dp}, or change the other values"
        )


def _fill_precision(ds: dict, train: TrainConfig, bf16_supported: bool, source: str) -> None:
    """bf16.enabled and fp16.enabled from the train config's precision ("auto": bf16 where the device has it)."""
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and bf16_supported)
    for section, default in (("bf16", use_bf16), ("fp16", False)):
        sub = ds.setdefault(section, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: '{section}' must be a JSON object such as {{\"enabled\": \"auto\"}}")
        _fill(sub, "enabled", default)
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError(f"{source}: bf16.enabled and fp16.enabled cannot both be true")
    if train.precision == "fp32" and (ds["bf16"]["enabled"] or ds["fp16"]["enabled"]):
        raise ConfigError(f"{source}: the train config asks for precision \"fp32\" but this DeepSpeed config "
                          "enables bf16/fp16; set them to \"auto\" or false")


def _fill_zero(ds: dict, accelerator: bool, output_dir: str | Path, source: str) -> None:
    """ZeRO stage 0 where the section is missing; the accelerator-only settings written "auto" follow the device;
    an NVMe offload's nvme_path "auto" is `output_dir`/nvme_offload."""
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3")
    for key in ACCELERATOR_ONLY:
        if zero.get(key) == "auto":
            zero[key] = accelerator
    for section in OFFLOAD_SECTIONS:
        if offload_device(ds, section) != "nvme":
            continue
        offload = zero[section]
        if offload.get("nvme_path") is None:
            raise ConfigError(f"{source}: zero_optimization.{section}.device \"nvme\" needs nvme_path: a folder "
                              "on a fast local drive, or \"auto\" for a folder in the run's output_dir")
        if offload["nvme_path"] == "auto":
            offload["nvme_path"] = str(Path(output_dir) / NVME_DIR)


def _check_pure_bf16(ds: dict, train: TrainConfig, source: str) -> None:
    """bf16 master weights and optimizer states need bf16 on and a ZeRO stage to keep them."""
    pure_bf16 = [k for k in ("bf16_master_weights_and_grads", "bf16_optimizer_states") if ds["bf16"].get(k)]
    if pure_bf16 and not ds["bf16"]["enabled"]:
        raise ConfigError(f"{source}: bf16.{pure_bf16[0]} keeps weights in bf16, but bf16 is off for this run "
                          f"(train config precision {json.dumps(train.precision)}); set precision to \"bf16\" or "
                          "use a DeepSpeed config without it")
    if pure_bf16 and ds["zero_optimization"].get("stage", 0) == 0:
        raise ConfigError(f"{source}: bf16.{pure_bf16[0]} needs ZeRO stage 1, 2 or 3 (zero_optimization.stage)")


def reject_sections_we_build(ds: dict, source: str) -> None:
    """The optimizer and the LR schedule come from the train config, so DeepSpeed must not build its own."""
    if "scheduler" in ds:
        raise ConfigError(f"{source}: remove the 'scheduler' section; the learning-rate schedule comes from "
                          "the train config's 'schedule' section")
    if "optimizer" in ds:
        raise ConfigError(f"{source}: remove the 'optimizer' section; the optimizer is built from the train "
                          "config's 'optimizer' section")


def check_no_auto_left(ds: dict, source: str, allowed: tuple[str, ...] = ()) -> None:
    """An "auto" anywhere but at the `allowed` dotted keys is an error (plain DeepSpeed would drop it silently)."""
    left = [key for key in _autos(ds) if key not in allowed]
    if left:
        raise ConfigError(f"{source}: cannot resolve \"auto\" for {', '.join(left)}; only "
                          f"{', '.join(AUTO_KEYS)} may be \"auto\"")


def _autos(node, prefix=""):
    """Dotted keys of every value still written "auto"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix[:-1]


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offload_device(ds: dict, section: str) -> str:
    """"none", "cpu" or "nvme": where `zero_optimization.<section>` (offload_optimizer, offload_param) puts it."""
    offload = ds.get("zero_optimization", {}).get(section)
    return offload.get("device", "none") if isinstance(offload, dict) else "none"


def nvme_paths(ds: dict) -> list[Path]:
    """The swap folders of ZeRO-Infinity's NVMe offload (optimizer states, parameters), if the config has any."""
    zero = ds.get("zero_optimization", {})
    return sorted({Path(zero[s]["nvme_path"]) for s in OFFLOAD_SECTIONS
                   if offload_device(ds, s) == "nvme" and zero[s].get("nvme_path")})


def check_nvme_offload(ds: dict, source: str) -> None:
    """NVMe offload swaps through DeepSpeed's async_io op, which is compiled on first use against libaio: without
    the library DeepSpeed fails deep in the engine's set-up, so say what to install first."""
    if not nvme_paths(ds):
        return
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if not installed_ops.get("async_io") and not (builder and builder.is_compatible(verbose=False)):
        raise ConfigError(f"{source}: offloading to \"nvme\" needs DeepSpeed's async_io op, which needs libaio and "
                          "its headers: install them (Debian/Ubuntu: apt-get install libaio-dev) and run again, or "
                          "offload to \"cpu\"")


def nvme_offloads_optimizer(ds: dict) -> bool:
    return offload_device(ds, "offload_optimizer") == "nvme"


def offloads_optimizer(ds: dict) -> bool:
    return offload_device(ds, "offload_optimizer") in ("cpu", "nvme")
