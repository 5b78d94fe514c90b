"""Started by the tests on 2 ranks: load a run's latest checkpoint into a DeepSpeed
engine built from the run's own resolved configs, and save its logits on fixed inputs (rank 0)."""

import argparse
import json
from pathlib import Path

import torch

from astrai_ds.config.base import from_dict
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import TrainConfig
from astrai_ds.model import Transformer
from astrai_ds.training.distributed import exit_process, init_distributed
from astrai_ds.training.engine import build_engine

p = argparse.ArgumentParser()
p.add_argument("--run", required=True)
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int, default=-1)
args = p.parse_args()
run = Path(args.run)

info = init_distributed()
cfg = from_dict(TrainConfig, json.loads((run / "train_config.json").read_text()), "train_config.json")
model_cfg = ModelConfig.load(run / "model_config.json")
engine = build_engine(Transformer(model_cfg), cfg, json.loads((run / "ds_config.json").read_text()))
engine.load_checkpoint(str(run), tag=(run / "latest").read_text().strip())
engine.eval()
input_ids = torch.randint(0, model_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = engine(input_ids.to(engine.device)).float().cpu()
if info.rank == 0:
    torch.save({"input_ids": input_ids, "logits": logits}, args.out)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
exit_process(0)
