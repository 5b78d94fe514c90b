"""What a training run needs per GPU, known before it is launched: model states for each ZeRO stage and
offload option, and activations per micro-batch with and without activation checkpointing.

Model states use the byte counts of DeepSpeed's own estimators (16-bit weights 2 bytes per parameter; 16-bit
gradients 2, fp32 gradients 4, fp32 master weights 4 and Adam's two moments 8, partitioned or not by the stage):
ZeRO-2 and ZeRO-3 call `estimate_zero2_model_states_mem_needs` and `estimate_zero3_model_states_mem_needs`;
ZeRO-0 and ZeRO-1 partition nothing or only the fp32 states. Host memory is per node.

ZeRO-Infinity (offload to NVMe, e.g. ds_configs/zero3_nvme.json) has no DeepSpeed estimator; its rows count what
its swap files hold, measured on the 1B run (docs/benchmarks.md): the fp32 master weights, Adam's two moments and
the fp32 gradients, 16 bytes per parameter on the nodes' drives, plus the 16-bit weights when they are swapped
too. Host memory then keeps each rank's fp32 gradient partition while the backward pass fills it.

Activations are what a block keeps for its backward pass: 10 x dim + 4 x ffn_dim + n_heads values per token
(inputs and outputs of the norms, queries, keys and values at the query width, the attention output before and
after its projection, the residual stream, the SwiGLU tensors, one log-sum-exp per head; QK-norm adds its
inputs and outputs), as measured with
saved-tensor hooks on this model's block (the tests check the count). Attention keeps no T x T matrix (flash
or memory-efficient attention). With activation checkpointing a block keeps only its input, and one block at a
time is recomputed in the backward pass. The output layer adds the logits and their fp32 log-softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from astrai_ds.config.model import ModelConfig

BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory


@dataclass(frozen=True)
class ParamCounts:
    total: int  # a tied embedding counted once
    embedding: int  # the token embedding, and the output head when it is not tied
    largest_layer: int  # the most parameters one module holds itself (what ZeRO-3 gathers at once)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counted on the meta device: no memory, so any size works."""
    from astrai_ds.model.transformer import shape_model

    model = shape_model(cfg)
    unique = {id(p): p for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embedding = model.embed.tok_embeddings.weight.numel()
    if not cfg.tie_embeddings:
        embedding += model.head.output.weight.numel()
    return ParamCounts(sum(p.numel() for p in unique.values()), embedding, largest)


@dataclass(frozen=True)
class StatesOption:
    name: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    zero_init: bool
    gpu_bytes: int  # per GPU
    host_bytes: int  # per node
    nvme: bool = False  # the offloaded states go to NVMe swap files, not host memory
    nvme_bytes: int = 0  # per node


def model_states(counts: ParamCounts, gpus_per_node: int, nodes: int) -> list[StatesOption]:
    """Every ZeRO stage and offload option, in DeepSpeed's byte counts (mixed precision with Adam)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, n = counts.total, gpus_per_node * nodes
    loaded = int(p * 4 * gpus_per_node * BUFFER_FACTOR)  # every rank of a node builds the whole fp32 model
    options = [StatesOption("ZeRO-0", 0, False, False, False, 20 * p, loaded),
               StatesOption("ZeRO-1", 1, False, False, False, 4 * p + 16 * p // n, loaded)]
    for offload in (False, True):
        host, gpu = estimate_zero2_model_states_mem_needs(p, gpus_per_node, nodes, cpu_offload=offload,
                                                          additional_buffer_factor=BUFFER_FACTOR)
        options.append(StatesOption("ZeRO-2" + (" + offload optimizer" if offload else ""), 2, offload, False,
                                    False, gpu, host))
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            p, counts.largest_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_params,
            zero_init=True, additional_buffer_factor=BUFFER_FACTOR)
        name = "ZeRO-3" + (" + offload optimizer and params" if offload_params else
                           " + offload optimizer" if offload else "")
        options.append(StatesOption(name, 3, offload, offload_params, True, gpu, host))
    grads_host = int(4 * p * gpus_per_node / n * BUFFER_FACTOR)  # fp32 gradient partitions of a node's ranks
    for offload_params in (False, True):
        name = "ZeRO-3 + optimizer" + (" and params" if offload_params else "") + " on NVMe"
        gpu = 4 * counts.largest_layer + (0 if offload_params else 2 * p // n)
        options.append(StatesOption(name, 3, True, offload_params, True, gpu, grads_host, True,
                                    (18 if offload_params else 16) * p // nodes))
    return options


def asked_option(options: list[dict], ds: dict) -> dict | None:
    """The row of `plan`'s options (dicts of StatesOption) that a DeepSpeed config asks for: its ZeRO stage, what it
    offloads and whether to NVMe; None for one the estimators do not cover (parameter offload alone)."""
    from astrai_ds.config.deepspeed import offload_device, zero_stage

    devices = [offload_device(ds, section) for section in ("offload_optimizer", "offload_param")]
    key = (zero_stage(ds), devices[0] != "none", devices[1] != "none", "nvme" in devices)
    return next((o for o in options if (o["stage"], o["offload_optimizer"], o["offload_params"], o["nvme"]) == key),
                None)


def block_values_per_token(cfg: ModelConfig) -> int:
    """Values one block keeps for backward per token (see the module docstring)."""
    qk_norm = 2 * (cfg.dim + cfg.n_kv_heads * cfg.head_size) if cfg.qk_norm else 0  # the norms' inputs and outputs
    return 10 * cfg.dim + 4 * cfg.ffn_dim + cfg.n_heads + qk_norm


@dataclass(frozen=True)
class Activations:
    blocks: int  # bytes per micro-batch, without activation checkpointing
    blocks_checkpointed: int  # with it: the blocks' inputs plus one block recomputed
    logits: int

    def total(self, checkpointing: bool) -> int:
        return (self.blocks_checkpointed if checkpointing else self.blocks) + self.logits


def activations(cfg: ModelConfig, micro_batch: int, seq_len: int, bytes_per_value: int = 2) -> Activations:
    tokens = micro_batch * seq_len
    block = tokens * block_values_per_token(cfg) * bytes_per_value
    inputs = tokens * cfg.dim * bytes_per_value * cfg.n_layers
    logits = tokens * int(cfg.vocab_size) * (bytes_per_value + 4)
    return Activations(block * cfg.n_layers, inputs + block, logits)


def plan(cfg: ModelConfig, gpus_per_node: int, nodes: int, micro_batch: int, seq_len: int, gpu_memory: int,
         checkpointing: bool, bytes_per_value: int = 2) -> dict:
    """Everything `astrai-ds plan` prints, as a JSON-ready dict (bytes)."""
    counts = param_counts(cfg)
    act = activations(cfg, micro_batch, seq_len, bytes_per_value)
    usable = int(gpu_memory * 0.9)  # leave a tenth for the CUDA context, communication buffers and fragmentation
    rows = []
    for option in model_states(counts, gpus_per_node, nodes):
        need = option.gpu_bytes + act.total(checkpointing)
        rows.append({**asdict(option), "activations": act.total(checkpointing), "gpu_total": need,
                     "fits": need <= usable})
    return {"params": asdict(counts), "gpus": gpus_per_node * nodes, "gpus_per_node": gpus_per_node, "nodes": nodes,
            "micro_batch": micro_batch, "seq_len": seq_len, "activation_checkpointing": checkpointing,
            "bytes_per_value": bytes_per_value, "gpu_memory": gpu_memory, "usable_gpu_memory": usable,
            "activations": asdict(act), "options": rows}
