"""`astrai-ds plan` and its memory model: parameter counts equal the real model's, model states are DeepSpeed's
estimators, the activation count per token is what the block really keeps for backward (measured with saved-tensor
hooks, with and without activation checkpointing), and the CLI marks the option its DeepSpeed config asks for.
With LoRA: the adapters counted are those `apply_lora` adds, the model states follow the formulas written out below,
and every option needs less than full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import LoraConfig
from astrai_ds.model import Transformer
from astrai_ds.model.lora import apply_lora
from astrai_ds.training.memory import (activations, block_values_per_token, lora_counts, lora_states, model_states,
                                       param_counts)
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


def _saved_bytes(cfg: ModelConfig, batch: int, seq_len: int, checkpointing: bool,
                 lora: LoraConfig | None = None) -> int:
    """Bytes of the tensors the blocks keep for backward (weights left out), measured."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.activation_checkpointing = checkpointing
    if lora:
        apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target)
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
            "--seq-len", "2048", "--gpu-memory", "20GiB"]
    assert main(args + ["--ds_config", "zero3.json", "--activation-checkpointing", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in plan["options"]}
    assert [n for n, r in rows.items() if r["asked"]] == ["ZeRO-3"]
    assert not rows["ZeRO-0"]["fits"] and rows["ZeRO-3"]["fits"]  # 1B on two 20 GiB GPUs: ZeRO-0 does not fit
    for row in rows.values():
        assert row["fits"] == (row["gpu_bytes"] + row["activations"] <= plan["usable_gpu_memory"])
    assert main(args + ["--ds_config", "zero2.json", "--no-activation-checkpointing"]) == 0
    zero2 = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("ZeRO-2 "))
    assert zero2.endswith("<- --ds_config")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r, target", [(8, LoraConfig().target), (4, ["wq", "wv", "w2"]),
                                       (2, ["re:layers\\.0\\..*", "re:head\\.output"])])
def test_lora_adapters_are_what_apply_lora_adds(shape, r, target):
    cfg = ModelConfig(vocab_size=512, max_seq_len=256, **shape)
    model = Transformer(cfg)
    apply_lora(model, r, 16.0, 0.0, target)
    added = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    lora = lora_counts(cfg, LoraConfig(r=r, target=target))
    assert lora.adapter == added
    if target == LoraConfig().target:  # r x (in + out) for each projection of each block
        q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
        per_block = 2 * (cfg.dim + q) + 2 * (cfg.dim + kv) + 3 * (cfg.dim + cfg.ffn_dim)
        assert lora.adapter == r * cfg.n_layers * per_block


def test_lora_model_states_follow_the_formulas():
    """2 nodes x 4 GPUs, r 4 on every projection of the 2-block dim-128 model: the frozen base's 16-bit weights
    (2 B/param; ZeRO-3 shards them and gathers the largest layer, parameter offload moves them to the host), the
    adapters' 16-bit weights and gradients (2 + 2 B/param), their fp32 states (16 B/param, partitioned by ZeRO-1/2/3);
    the host holds what each node's ranks load in fp32 or, when more, the offloaded states (x 1.5, DeepSpeed's
    buffer factor)."""
    cfg = ModelConfig(vocab_size=512, max_seq_len=256, **SHAPES[0])  # dim 128, 8 heads of 16, 2 KV heads, ffn 344
    base = 512 * 128 + 2 * (2 * 128 * 128 + 2 * 32 * 128 + 3 * 128 * 344 + 2 * 128) + 128  # tied embedding
    largest = 512 * 128  # the embedding
    a = 4 * 2 * (2 * (128 + 128) + 2 * (128 + 32) + 3 * (128 + 344))
    g, n = 4, 8  # GPUs per node, GPUs
    assert (base, a) == (412288, 17984)
    full_load = int(4 * (base + a) * g * 1.5)
    z3_load = 4 * largest * g * 1.5
    expected = {  # name: (base, adapters, optimizer, host, nvme) bytes
        "ZeRO-0": (2 * base, 4 * a, 16 * a, full_load, 0),
        "ZeRO-1": (2 * base, 4 * a, 16 * a // n, full_load, 0),
        "ZeRO-2": (2 * base, 2 * a + 2 * a // n, 16 * a // n, full_load, 0),
        "ZeRO-2 + offload optimizer": (2 * base, 2 * a, 0, full_load, 0),
        "ZeRO-3": (2 * largest + 2 * base // n, 4 * a // n, 16 * a // n, z3_load, 0),
        "ZeRO-3 + offload optimizer": (2 * largest + 2 * base // n, 2 * a // n, 0, z3_load, 0),
        "ZeRO-3 + offload optimizer and params": (2 * largest, 0, 0, max(z3_load, (2 * (base + a) + 16 * a) / 2 * 1.5),
                                                  0),
        "ZeRO-3 + optimizer on NVMe": (2 * largest + 2 * base // n, 2 * a // n, 0, z3_load, 16 * a // 2),
        "ZeRO-3 + optimizer and params on NVMe": (2 * largest, 0, 0, z3_load, (2 * (base + a) + 16 * a) // 2),
    }
    counts = param_counts(cfg)
    assert (counts.total, counts.largest_layer) == (base, largest)
    rows = lora_states(counts, lora_counts(cfg, LoraConfig(r=4)), gpus_per_node=g, nodes=2)
    got = {r.name: (r.base_bytes, r.adapter_bytes, r.optimizer_bytes, r.host_bytes, r.nvme_bytes) for r in rows}
    assert got == {name: tuple(int(v) for v in want) for name, want in expected.items()}
    assert all(r.gpu_bytes == r.base_bytes + r.adapter_bytes + r.optimizer_bytes for r in rows)
    assert [r.name for r in rows] == [r.name for r in model_states(counts, g, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_activations_are_what_the_blocks_keep(shape, dropout):
    """The base block's count less the values the frozen norms keep for their weights' gradients, plus each
    adapter's r values per token, and with dropout its dropped input and the mask (a byte per value): measured with
    adapters on every projection, an upper bound with fewer."""
    cfg = ModelConfig(vocab_size=512, max_seq_len=256, **shape)
    batch, seq_len, r = 2, 128, 8
    tokens = batch * seq_len
    lora = LoraConfig(r=r, dropout=dropout)
    est, full = activations(cfg, batch, seq_len, 4, lora_counts(cfg, lora)), activations(cfg, batch, seq_len, 4)
    norms = 2 * cfg.dim + (cfg.dim + cfg.n_kv_heads * cfg.head_size if cfg.qk_norm else 0)  # normalized inputs
    dropped = 5 * cfg.dim + cfg.n_heads * cfg.head_size + cfg.ffn_dim  # the seven projections' inputs
    per_block = tokens * (7 * r * 4 - norms * 4 + (dropped * (4 + 1) if dropout else 0))  # fp32 on this CPU
    assert est.blocks == full.blocks + cfg.n_layers * per_block
    assert est.blocks_checkpointed == full.blocks_checkpointed + per_block  # one block recomputed at a time
    measured = _saved_bytes(cfg, batch, seq_len, False, lora)
    fewer = LoraConfig(r=r, dropout=dropout, target=["wq", "wv", "w2"])
    bound = activations(cfg, batch, seq_len, 4, lora_counts(cfg, fewer)).blocks
    measured_fewer = _saved_bytes(cfg, batch, seq_len, False, fewer)
    print(f"\n  dim {cfg.dim} dropout {dropout}: {measured / est.blocks:.4f} of the count; fewer targets "
          f"{measured_fewer / bound:.4f}")
    # within 2.5%: the final norm, outside the blocks, keeps less too (2% of 2 blocks of dim 128), the rotary
    # tables and dropout a little more
    assert measured == pytest.approx(est.blocks, rel=0.025)
    assert 0.7 * bound <= measured_fewer <= bound


def _plan_json(args: list[str], capsys) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model, cluster", [
    (ONE_B, ["--nodes", "2", "--gpus-per-node", "8"]),
    (ONE_B, ["--nodes", "1", "--gpus-per-node", "1"]),
    (ONE_B.replace("1b.json", "small.json"), ["--vocab-size", "512", "--gpus-per-node", "2"]),
])
def test_lora_needs_less_than_full_fine_tuning(model, cluster, capsys):
    """Every option needs less memory in all (GPUs, hosts, drives), and less per GPU but for ZeRO-2 with the
    optimizer offloaded: there a full run's GPU keeps only the 16-bit weights too, and LoRA adds its adapters'."""
    full = _plan_json(["--model", model, *cluster], capsys)
    lora = _plan_json(["--model", model, *cluster, "--lora-r", "8"], capsys)
    assert full["lora"] is None and lora["lora"]["r"] == 8 and lora["lora"]["target"] == LoraConfig().target
    a = lora["lora"]["adapter_params"]
    assert lora["lora"]["frozen_params"] == full["params"]["total"] > 10 * a

    def in_all(row, plan):
        return row["gpu_bytes"] * plan["gpus"] + (row["host_bytes"] + row["nvme_bytes"]) * plan["nodes"]

    for f, row in zip(full["options"], lora["options"], strict=True):
        assert row["name"] == f["name"] and in_all(row, lora) < in_all(f, full)
        assert row["gpu_bytes"] == row["base_bytes"] + row["adapter_bytes"] + row["optimizer_bytes"]
        if row["name"] == "ZeRO-2 + offload optimizer":
            assert row["gpu_bytes"] == f["gpu_bytes"] + 2 * a and row["host_bytes"] < f["host_bytes"]
        else:
            assert row["gpu_bytes"] < f["gpu_bytes"] and row["gpu_total"] < f["gpu_total"]
        assert row["nvme_bytes"] < f["nvme_bytes"] or not f["nvme"]


def test_plan_takes_lora_from_the_train_config(tmp_path, capsys):
    train = json.loads((Path(ONE_B).parents[1] / "train" / "pt_1b.json").read_text())
    path = tmp_path / "lora.json"
    path.write_text(json.dumps({**train, "model": ONE_B, "lora": {"r": 4, "dropout": 0.1, "target": ["wq", "wv"]}}))
    plan = _plan_json(["--config", str(path)], capsys)
    assert {k: plan["lora"][k] for k in ("r", "target", "dropout", "layers")} == {
        "r": 4, "target": ["wq", "wv"], "dropout": 0.1, "layers": 48}
    assert _plan_json(["--config", str(path), "--lora-r", "16", "--lora-target", "w2"], capsys)["lora"][
        "adapter_params"] == 16 * 24 * (6912 + 1536)  # the 1B model's 24 blocks
    assert _plan_json(["--config", str(path), "--lora-r", "0"], capsys)["lora"] is None
    assert main(["plan", "--model", ONE_B, "--lora-r", "8"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r 8 on wq, wk, wv, wo, w1, w2, w3: 6.7M adapter parameters trained (168 layers), 994.9M frozen" in out
    assert "adapters   optim." in out


@pytest.mark.parametrize("args, fragment", [
    (["--model", ONE_B, "--lora-r", "8", "--lora-target", "wz"],
     "--lora-target ['wz'] matches none of the model's linear layers; their names are output, w1, w2, w3"),
    (["--model", ONE_B, "--lora-r", "8", "--lora-target", "re:("], "--lora-target 're:(' is not a valid regular"),
    (["--model", ONE_B, "--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--model", ONE_B, "--lora-target", "wq"], "--lora-target needs --lora-r N"),
    ([ "--model", ONE_B.replace("1b.json", "tiny.json")], 'vocab_size is "auto"'),
    (["--model", ONE_B, "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a size"),
    (["--model", ONE_B, "--seq-len", "4096"], "above the model's max_seq_len 2048"),
    (["--model", ONE_B, "--nodes", "0"], "--nodes must be at least 1"),
    ([], "give --model"),
])
def test_plan_refuses_bad_input(args, fragment, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
