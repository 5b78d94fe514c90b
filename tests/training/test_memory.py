"""`astrai-ds plan` and its memory model: parameter counts equal the real model's, model states are DeepSpeed's
estimators, the activation count per token is what the block really keeps for backward (measured with saved-tensor
hooks, with and without activation checkpointing), and the CLI marks the option its DeepSpeed config asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.config.model import ModelConfig
from astrai_ds.model import Transformer
from astrai_ds.training.memory import activations, block_values_per_token, model_states, param_counts
from conftest import VENV_BIN, run_cmd

ONE_B = str(Path(__file__).resolve().parents[2] / "configs" / "model" / "1b.json")
SHAPES = [dict(dim=128, n_heads=8, n_kv_heads=2, ffn_dim=344, n_layers=2, tie_embeddings=True),
          dict(dim=192, n_heads=6, n_kv_heads=2, ffn_dim=512, n_layers=3, tie_embeddings=False),
          dict(dim=256, n_heads=4, n_kv_heads=4, ffn_dim=1024, n_layers=2, qk_norm=True)]


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_are_the_models(shape):
    cfg = ModelConfig(vocab_size=512, max_seq_len=256, **shape)
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == model.num_params()
    assert counts.embedding == 512 * cfg.dim * (1 if cfg.tie_embeddings else 2)
    assert counts.largest_layer == max(512 * cfg.dim, cfg.dim * cfg.ffn_dim)


def _saved_bytes(cfg: ModelConfig, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes of the tensors the blocks keep for backward (weights left out), measured."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.activation_checkpointing = checkpointing
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden(ids).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("shape", SHAPES)
def test_the_activation_count_is_what_the_blocks_keep(shape, capsys):
    cfg = ModelConfig(vocab_size=512, max_seq_len=256, **shape)
    batch, seq_len = 2, 128
    tokens = batch * seq_len
    measured = _saved_bytes(cfg, batch, seq_len, False)
    predicted = tokens * block_values_per_token(cfg) * 4 * cfg.n_layers  # fp32 on this CPU
    assert measured == pytest.approx(predicted, rel=0.02)
    # with checkpointing each block keeps its input (and the rotary tables' small share) only
    checkpointed = _saved_bytes(cfg, batch, seq_len, True)
    inputs = tokens * cfg.dim * 4 * cfg.n_layers
    assert inputs <= checkpointed <= 1.15 * inputs
    est = activations(cfg, batch, seq_len, bytes_per_value=4)
    assert est.blocks == predicted and est.blocks_checkpointed < est.blocks
    with capsys.disabled():
        print(f"\n  dim {cfg.dim}: saved for backward {measured / 2**20:.2f} MiB without activation checkpointing, "
              f"{checkpointed / 2**20:.2f} MiB with")


def test_model_states_are_deepspeeds_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = param_counts(ModelConfig.load(ONE_B))
    assert 0.9e9 < counts.total < 1.1e9  # the seed's 1B model
    rows = {r.name: r for r in model_states(counts, gpus_per_node=8, nodes=2)}
    assert rows["ZeRO-2"].gpu_bytes == estimate_zero2_model_states_mem_needs(counts.total, 8, 2, False, 1.5)[1]
    assert rows["ZeRO-3 + offload optimizer"].host_bytes == estimate_zero3_model_states_mem_needs(
        counts.total, counts.largest_layer, 8, 2, True, False, True, 1.5)[0]
    gpu = [rows[n].gpu_bytes for n in ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3")]
    assert gpu == sorted(gpu, reverse=True) and gpu[0] == 20 * counts.total


def test_nvme_rows_count_the_swap_files(capsys):
    """ZeRO-Infinity's rows: the optimizer's fp32 states and gradients (16 B/param) on the nodes' drives, the
    GPU keeping what ZeRO-3 with the optimizer offloaded keeps; zero3_nvme.json is marked as that row."""
    counts = param_counts(ModelConfig.load(ONE_B))
    rows = {r.name: r for r in model_states(counts, gpus_per_node=8, nodes=2)}
    nvme, params_too = rows["ZeRO-3 + optimizer on NVMe"], rows["ZeRO-3 + optimizer and params on NVMe"]
    assert nvme.nvme and nvme.nvme_bytes == 16 * counts.total // 2 and params_too.nvme_bytes > nvme.nvme_bytes
    assert nvme.gpu_bytes == rows["ZeRO-3 + offload optimizer"].gpu_bytes
    assert nvme.host_bytes < rows["ZeRO-3 + offload optimizer"].host_bytes
    assert not any(r.nvme for name, r in rows.items() if "NVMe" not in name)
    assert main(["plan", "--model", ONE_B, "--gpus-per-node", "2", "--ds_config", "zero3_nvme.json", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in plan["options"] if r["asked"]] == ["ZeRO-3 + optimizer on NVMe"]


def test_plan_json_is_the_whole_of_stdout():
    """`astrai-ds plan --json | jq`: DeepSpeed's own log lines (its accelerator warning) go to stderr."""
    proc = run_cmd([str(VENV_BIN / "astrai-ds"), "plan", "--model", ONE_B, "--gpus-per-node", "2", "--json"])
    assert json.loads(proc.stdout)["params"]["total"] == param_counts(ModelConfig.load(ONE_B)).total


def test_plan_marks_the_asked_option_and_says_what_fits(capsys):
    args = ["plan", "--model", ONE_B, "--nodes", "1", "--gpus-per-node", "2", "--micro-batch", "8",
            "--seq-len", "2048", "--gpu-memory", "24GiB"]
    assert main(args + ["--ds_config", "zero3.json", "--activation-checkpointing", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in plan["options"]}
    assert [n for n, r in rows.items() if r["asked"]] == ["ZeRO-3"]
    assert not rows["ZeRO-0"]["fits"] and rows["ZeRO-3"]["fits"]  # 1B on two 24 GiB GPUs: ZeRO-0 does not fit
    for row in rows.values():
        assert row["fits"] == (row["gpu_bytes"] + row["activations"] <= plan["usable_gpu_memory"])
    assert main(args + ["--ds_config", "zero2.json", "--no-activation-checkpointing"]) == 0
    zero2 = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("ZeRO-2 "))
    assert zero2.endswith("<- --ds_config")


@pytest.mark.parametrize("args, fragment", [
    ([ "--model", ONE_B.replace("1b.json", "tiny.json")], 'vocab_size is "auto"'),
    (["--model", ONE_B, "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a size"),
    (["--model", ONE_B, "--seq-len", "4096"], "above the model's max_seq_len 2048"),
    (["--model", ONE_B, "--nodes", "0"], "--nodes must be at least 1"),
    ([], "give --model"),
])
def test_plan_refuses_bad_input(args, fragment, capsys):
    assert main(["plan", *args]) == 2
    assert fragment in capsys.readouterr().err
