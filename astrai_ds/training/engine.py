"""Wrap a model in a DeepSpeed engine: optimizer groups, LR schedule, ZeRO from the resolved config."""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from astrai_ds.config.deepspeed import offloads_optimizer
from astrai_ds.config.train import TrainConfig
from astrai_ds.training.schedules import lr_multiplier


def _is_matrix(p: torch.nn.Parameter) -> bool:
    """A linear or embedding weight, not a norm gain. A parameter partitioned by `zero.Init` is a flat shard: its
    own shape is `ds_shape`."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norm gains."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if _is_matrix(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_param_groups(model: torch.nn.Module, opt) -> list[dict]:
    """Muon for the blocks' matrices, AdamW for the rest: the embedding and the head (tied or not) and the norm gains,
    as the Muon authors split them. Each trainable parameter is tagged `use_muon`, which DeepSpeed's ZeRO reads to
    orthogonalise a Muon matrix's whole gradient before partitioning it."""
    muon, adam_matrices, adam_rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = _is_matrix(p)
        p.use_muon = matrix and name.startswith("layers.")
        (muon if p.use_muon else adam_matrices if matrix else adam_rest).append(p)
    adam = {"use_muon": False, "lr": opt.lr, "betas": opt.betas, "eps": opt.eps}
    groups = [{"params": adam_matrices, **adam, "weight_decay": opt.weight_decay},  # first: the logged lr is `lr`
              {"params": adam_rest, **adam, "weight_decay": 0.0},
              {"params": muon, "use_muon": True, "lr": opt.muon_lr, "momentum": opt.muon_momentum,
               "weight_decay": opt.weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.type == "muon":
        # DeepSpeed's Muon with its auxiliary AdamW (torch's fused kernel); ZeRO-1/2/3 recognise it by its class.
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        return MuonWithAuxAdam(muon_param_groups(model, opt), adam_optimizer=torch.optim.AdamW,
                               adam_optimizer_kwargs={"fused": True})
    groups = param_groups(model, opt.weight_decay)
    if offloads_optimizer(ds_config):
        # ZeRO-Offload steps the optimizer on the host; DeepSpeed's vectorised CPU Adam is the one built for it.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, adamw_mode=True)
    # The fused kernel exists on CPU as well as CUDA: on a CPU it made ZeRO-2's optimizer step about
    # 1.7x faster than the per-tensor loop (benchmarks/train_throughput.py --breakdown).
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict):
    """`deepspeed.initialize` with our optimizer and LR schedule; DeepSpeed steps the schedule and saves it
    in checkpoints together with the optimizer state."""
    import deepspeed

    optimizer = build_optimizer(model, cfg, ds_config)
    schedule = partial(lr_multiplier, cfg=cfg.schedule, total_steps=cfg.schedule_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda wrapped: LambdaLR(wrapped, schedule),
        config=ds_config,
    )
    return engine


def build_model(model_cfg, ds_config: dict, seed: int, init_from=None, activation_checkpointing: bool = False):
    """The model an engine will wrap. Under ZeRO-3 it is built inside `deepspeed.zero.Init`: each module's
    parameters are partitioned over the ranks as soon as the module is constructed, so no rank ever holds the
    whole model, and a model larger than one rank's memory starts. The weights are initialised from the torch RNG
    in the same order either way, so the same seed gives the same weights as an unsharded build (the ZeRO parity
    tests compare them). `init_from` (a model folder) is loaded one module at a time: gathered, filled on rank 0,
    partitioned again."""
    from astrai_ds.config.deepspeed import zero_stage
    from astrai_ds.model import Transformer
    from astrai_ds.model.io import load_weights

    torch.manual_seed(seed)  # the same init on every rank and for every ZeRO stage
    if zero_stage(ds_config) == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = Transformer(model_cfg)
        if init_from:
            load_weights_sharded(model, init_from)
    else:
        model = Transformer(model_cfg)
        if init_from:
            load_weights(model, init_from)
    model.activation_checkpointing = activation_checkpointing
    return model


def load_weights_sharded(model, model_dir) -> None:
    """`model.io.load_weights` for a model built under `deepspeed.zero.Init`: names and shapes are checked first
    (one clear error), then each module's own parameters are gathered, copied on rank 0 and partitioned again.
    Every rank reads the folder's tensors into host memory; only one module is whole on the device at a time."""
    import deepspeed
    import torch.distributed as dist

    from astrai_ds.model.io import check_state, folder_state

    state = folder_state(model.cfg, model_dir)
    named = dict(model.named_parameters(remove_duplicate=False))
    check_state({name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in named.items()}, state, str(model_dir))
    rank = dist.get_rank() if dist.is_initialized() else 0
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, p in own.items():
                        p.copy_(state[f"{prefix}.{name}" if prefix else name])
