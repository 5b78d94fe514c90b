"""Started by the tests on 2 ranks: build the model as training does under ZeRO-3 (`build_model`, inside
`deepspeed.zero.Init`) from a seed, and again from a model folder (--init-from), and save (rank 0) what each rank held
right after each construction and the gathered full weights (--out, --init-out)."""

import argparse

import deepspeed
import torch

from astrai_ds.config.model import ModelConfig
from astrai_ds.training.distributed import exit_process, init_distributed
from astrai_ds.training.engine import build_model, param_groups

p = argparse.ArgumentParser()
p.add_argument("--model-config", required=True)
p.add_argument("--out", required=True)
p.add_argument("--init-from", default=None)
p.add_argument("--init-out", default=None)
p.add_argument("--local_rank", type=int, default=-1)
args = p.parse_args()

info = init_distributed()
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": info.world_size,
      "zero_optimization": {"stage": 3}}


def build_and_save(init_from, out):
    model = build_model(ModelConfig.load(args.model_config), ds, seed=1234, init_from=init_from)
    params = dict(model.named_parameters())
    held = {name: int(p.numel()) for name, p in params.items()}  # what the rank holds whole (0 when partitioned)
    shard = {name: int(p.ds_tensor.numel()) for name, p in params.items()}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        full = {name: p.detach().clone() for name, p in params.items()}
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, {"held": held, "shard": shard})
    if info.is_main:
        decay = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
        torch.save({"ranks": gathered, "full": full, "decay": sorted(n for n, p in params.items() if id(p) in decay),
                    "tied": model.head.output.weight is model.embed.tok_embeddings.weight}, out)
    torch.distributed.barrier()


build_and_save(None, args.out)
if args.init_from:
    build_and_save(args.init_from, args.init_out)
exit_process(0)
