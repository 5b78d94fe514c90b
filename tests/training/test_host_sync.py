"""No host synchronisation inside a micro-step: the strategies' losses and metrics, the model's forward (RoPE, the
block masks of packed rows, the chunked head loss) and the backward never read a tensor's value on the host
(`.item()`, `.tolist()`, `float()`, `int()`, `bool()`, a tensor used as a Python index). On a GPU each such read
waits for every queued kernel; the trainer's logger reads the metrics once per logged step. Counted by wrapping
those methods of torch.Tensor while one micro-step runs, and while the logger takes each step's metrics."""

from __future__ import annotations

import contextlib
import traceback
from types import SimpleNamespace

import pytest
import torch

from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.losses import IGNORE_INDEX

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def host_reads():
    """Yields a list that collects (method, caller) for every host read of a tensor's value meanwhile."""
    calls, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append((name, f"{caller.filename}:{caller.lineno}"))
            return method(self, *args, **kwargs)
        return counted

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def test_the_counter_sees_each_kind_of_host_read():
    x = torch.tensor([3.0])
    with host_reads() as calls:
        x.item(), x.tolist(), float(x), int(x), bool(x), [0, 1, 2, 3][torch.tensor(1)]
    assert [name for name, _ in calls] == list(HOST_READS)


def _batches(g):
    ids = torch.randint(1, 97, (2, 16), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :4] = IGNORE_INDEX
    sft = {"input_ids": ids, "labels": labels, "doc_ids": torch.tensor([[0] * 8 + [1] * 8, [0] * 14 + [-1] * 2]),
           "position_ids": torch.cat([torch.arange(8), torch.arange(8)]).expand(2, 16).contiguous()}
    pairs = {"chosen_input_ids": ids, "chosen_labels": labels, "rejected_input_ids": ids.flip(1)[:, :12],
             "rejected_labels": labels.flip(1)[:, :12], "ref_chosen_logps": torch.tensor([-30.0, -28.0]),
             "ref_rejected_logps": torch.tensor([-29.0, -31.0])}
    rollout = {"input_ids": ids, "labels": labels, "advantages": torch.tensor([0.7, -0.7]),
               "num_tokens": torch.tensor([16, 16]), "old_logps": torch.full((2, 16), -4.0),
               "ref_logps": torch.full((2, 16), -4.1)}
    return {"pt": {"input_ids": ids, "labels": ids.roll(-1, 1)}, "sft": sft, "dpo": pairs, "grpo": rollout}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("stage", ["pt", "sft", "dpo", "grpo"])
def test_a_micro_step_reads_nothing_on_the_host(stage, fused):
    from astrai_ds.config.train import DPOConfig, GRPOConfig
    from astrai_ds.training.strategies import STRATEGIES

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=32)).float().train()
    strategy = STRATEGIES[stage].from_config({"dpo": DPOConfig(sft_weight=0.5), "grpo": GRPOConfig(beta=0.04)}
                                             .get(stage))
    strategy.fused = fused
    batch = _batches(torch.Generator().manual_seed(1))[stage]
    totals = strategy.counts(batch)  # counted before the step, as the trainer does (one all-reduce a step)
    with host_reads() as calls:
        loss, metrics = strategy.compute_loss(model, batch, totals)
        loss.backward()
        sums = {}
        for key, value in metrics.items():  # the trainer's accumulation over micro-batches
            sums[key] = sums.get(key, 0.0) + value
    assert calls == [], calls
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_the_logger_reads_the_metrics_on_the_host_only_when_it_writes_a_line(tmp_path):
    import torch.distributed as dist

    from astrai_ds.training.callbacks import Logger, MetricsWriter
    from astrai_ds.training.metrics import Throughput

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        logger = Logger(MetricsWriter(tmp_path, enabled=False), interval=4, throughput=Throughput(1e12))
        trainer = SimpleNamespace(state=SimpleNamespace(step=0, tokens_seen=0), cfg=SimpleNamespace(max_steps=8),
                                  dist=SimpleNamespace(world_size=1),
                                  train_batches=SimpleNamespace(sampler=SimpleNamespace(epoch=0)))
        reads = []
        for step in range(1, 9):  # what Trainer.train_step returns: the metrics and grad norm as tensors
            trainer.state.step = step
            metrics = {"metrics": {"loss": torch.tensor(2.0 + step), "dpo/margin": torch.tensor(0.25 * step)},
                       "lr": 1e-3, "tokens": 10, "flops": 1e6, "grad_norm": torch.tensor(1.5 + step)}
            with host_reads() as calls:
                logger.on_step_end(trainer, metrics)
            reads.append(len(calls))
    finally:
        dist.destroy_process_group()
    assert reads[:3] == reads[4:7] == [0, 0, 0], reads
    assert reads[3] > 0 and reads[7] > 0, reads
    assert logger.last["train/loss"] == 8.5  # steps 5-8: 7, 8, 9 and 10
    assert logger.last["dpo/margin"] == 1.625 and logger.last["train/grad_norm"] == 9.5
