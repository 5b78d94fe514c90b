"""Pipeline parallelism: the model's pipeline layers (model/pipeline.py) in DeepSpeed's PipelineModule, and what
lets the PT and SFT strategies drive DeepSpeed's pipeline engine.

The ranks form `parallel.pipeline_stages` stages x N data-parallel replicas. Each stage builds only its own
layers; tied input and output embeddings are one TiedLayerSpec on the first and the last stage, whose gradients
DeepSpeed all-reduces between the two. The pipeline engine owns the micro-batch loop: `train_batch` draws
`gradient_accumulation_steps` items of (inputs, labels) on the first and the last stage and calls the loss
function on the last one. The trainer still draws the step's micro-batches itself and counts them over all
ranks first, so a micro-batch's loss is its share of the global batch's loss exactly as without stages.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import ParallelConfig
from astrai_ds.model.pipeline import (BlockPipe, EmbeddingPipe, FinalNormPipe, OutputPipe, layer_prefixes, layer_state,
                                      tied_output)
from astrai_ds.model.transformer import build_parts, shape_model

TIED_KEY = "embed"  # the TiedLayerSpec key of the shared embedding / output matrix
TIED_WEIGHT = "tok_embeddings.weight"


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def build_pipeline_model(cfg: ModelConfig, parallel: ParallelConfig, seed: int, init_from=None,
                         activation_checkpointing: bool = False) -> nn.Module:
    """DeepSpeed's PipelineModule over the model's layers, with this rank's stage built and its weights set: from
    the model folder `init_from`, else the ones the plain model gets from `seed` (the whole model is built in the
    plain model's order, one part at a time, and each stage keeps its own layers)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    if cfg.tie_embeddings:
        embed = TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, tied_weight_attr=TIED_WEIGHT)
        output = TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, forward_fn=tied_output, tied_weight_attr=TIED_WEIGHT)
    else:
        embed, output = LayerSpec(EmbeddingPipe, cfg), LayerSpec(OutputPipe, cfg)
    specs = [embed, *(LayerSpec(BlockPipe, cfg, i) for i in range(cfg.n_layers)), LayerSpec(FinalNormPipe, cfg), output]
    pipe = PipelineModule(
        specs, num_stages=parallel.pipeline_stages, partition_method=parallel.partition_method,
        # Recompute each block in backward, with torch's non-reentrant checkpoint as the plain model does; the
        # embedding, whose integer inputs need no gradient, is never checkpointed.
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=partial(checkpoint, use_reentrant=False), checkpointable_layers=["BlockPipe"],
        # A batch's sequence length may change between micro-batches (SFT rows, evaluation): send shapes each time.
        dynamic_shape=True)
    local = local_layers(pipe, cfg)
    if init_from:
        _load_folder(local, cfg, init_from)
    else:
        _seeded_init(local, cfg, seed)
    return pipe


def local_layers(pipe, cfg: ModelConfig) -> list[tuple[str, nn.Module]]:
    """This stage's layers as (name prefix in the plain model, module); a tied embedding appears once."""
    prefixes = layer_prefixes(cfg)
    start, stop = pipe.parts[pipe.stage_id], pipe.parts[pipe.stage_id + 1]
    found: dict[int, tuple[str, nn.Module]] = {}
    for idx in range(start, stop):
        if cfg.tie_embeddings and idx in (0, len(prefixes) - 1):
            module, prefix = pipe.tied_modules[TIED_KEY], "embed."
        else:
            module, prefix = pipe._modules[str(idx)], prefixes[idx]
        found[id(module)] = (prefix, module)
    return list(found.values())


@torch.no_grad()
def _seeded_init(local: list[tuple[str, nn.Module]], cfg: ModelConfig, seed: int) -> None:
    torch.manual_seed(seed)
    for name, part in build_parts(cfg):  # one part in memory at a time
        state = {f"{name}.{key}": value for key, value in part.state_dict().items()}
        for prefix, module in local:
            if prefix.startswith(name + "."):
                module.load_state_dict(layer_state(state, prefix, module))


@torch.no_grad()
def _load_folder(local: list[tuple[str, nn.Module]], cfg: ModelConfig, model_dir) -> None:
    from astrai_ds.model.io import check_state, folder_state

    state = folder_state(cfg, model_dir)
    shapes = {n: tuple(p.shape) for n, p in shape_model(cfg).named_parameters(remove_duplicate=False)}
    check_state(shapes, state, str(model_dir))
    for prefix, module in local:
        module.load_state_dict(layer_state(state, prefix, module))


class PipelineLoss:
    """The last stage's loss function: the strategy's loss from the outputs and labels, with the step's global
    counts. DeepSpeed divides the loss by the accumulation steps in backward and averages gradients over the
    data-parallel replicas, so it gets the share multiplied by both (as the plain trainer's backward does). The
    unscaled shares are summed for the trainer's metrics."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.totals: dict | None = None
        self.scale = 1.0
        self.sum = torch.zeros(())

    def start(self, totals: dict, scale: float) -> None:
        self.totals, self.scale, self.sum = totals, scale, torch.zeros(())

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, metrics = self.strategy.loss(logits, labels, self.totals)
        self.sum = metrics["loss"] + self.sum  # on the loss's device: no host sync per micro-batch
        return loss * self.scale


class PipelineDriver:
    """Runs the trainer's micro-batches through the pipeline engine; every rank returns its share of the loss
    (zero on all but the last stage), so the trainer sums shares over ranks as without stages."""

    def __init__(self, engine, strategy):
        if not hasattr(strategy, "pipeline_inputs"):
            raise ValueError(f"stage {strategy.name!r} does not run on pipeline stages")
        self.engine, self.strategy = engine, strategy
        self.loss = PipelineLoss(strategy)
        engine.module.loss_fn = self.loss

    def _items(self, batches: list[dict]) -> list[tuple]:
        return [(self.strategy.pipeline_inputs(b), b["labels"]) for b in batches]

    def train(self, batches: list[dict], totals: dict) -> dict[str, torch.Tensor]:
        self.loss.start(totals, self.engine.gradient_accumulation_steps() * self.engine.dp_world_size)
        self.engine.train_batch(iter(self._items(batches)))
        return {"loss": self.loss.sum}

    @torch.no_grad()
    def evaluate(self, batches: list[dict], totals: dict) -> torch.Tensor:
        self.loss.start(totals, 1.0)
        self.engine.eval_batch(iter(self._items(batches)), num_micro_batches=len(batches))
        return self.loss.sum
