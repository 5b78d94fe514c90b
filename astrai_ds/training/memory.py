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
time is recomputed in the backward pass. The output layer adds the logits and their fp32 log-softmax, or, with the
chunked head loss (`fused_loss`, the default), a few bytes per token and one chunk's logits (`head_bytes`).

LoRA (astrai_ds/model/lora.py) freezes the base and trains only the adapters, so each option's model states are
the frozen base's 16-bit weights (2 bytes per parameter, a full copy per GPU unless ZeRO-3 shards it, on the host
under parameter offload), the adapters' 16-bit weights and gradients, and the adapters' fp32 optimizer states
(16 bytes per adapter parameter as above, partitioned or offloaded by the stage). A LoRA block keeps the base
block's activations less what its frozen norms no longer keep for their weights' gradients (their normalized
input), plus per token each adapter's r-wide inner value and, with dropout, its dropped input and the dropout's
mask (a byte per value): what the tests measure with adapters on all seven projections, and an upper bound with
fewer (a frozen projection without an adapter keeps no input).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import LoraConfig

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
class LoraCounts:
    """What LoRA's adapters add to a model (`lora_counts`)."""

    r: int
    target: list[str]
    dropout: float
    adapter: int  # lora_A (r x in) and lora_B (out x r) of every targeted layer: the parameters that train
    layers: tuple[tuple[str, int, int], ...]  # (name, in, out) of every targeted layer


def lora_counts(cfg: ModelConfig, lora: LoraConfig) -> LoraCounts:
    """The layers `lora.target` picks, chosen by LoRA's own matching on the meta-device model (so exactly those a run
    adapts), and their adapters' size; a target that matches no layer is a ConfigError."""
    from astrai_ds.model.lora import lora_targets
    from astrai_ds.model.transformer import shape_model

    model = shape_model(cfg)
    modules = dict(model.named_modules())
    layers = tuple((name, modules[name].in_features, modules[name].out_features)
                   for name in lora_targets(model, lora.target))
    return LoraCounts(lora.r, list(lora.target), lora.dropout, sum(lora.r * (i + o) for _, i, o in layers), layers)


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


@dataclass(frozen=True)
class LoraStatesOption(StatesOption):
    base_bytes: int = 0  # per GPU: the frozen base's 16-bit weights (and under ZeRO-3 its largest layer gathered)
    adapter_bytes: int = 0  # per GPU: the adapters' 16-bit weights and gradients
    optimizer_bytes: int = 0  # per GPU: the adapters' fp32 master weights, gradients and Adam moments


def lora_states(counts: ParamCounts, lora: LoraCounts, gpus_per_node: int, nodes: int) -> list[LoraStatesOption]:
    """`model_states`' options for a LoRA run, in the same byte counts, with the base frozen (see the module's
    docstring). Host memory: every rank of a node builds the whole fp32 model unless zero.Init builds one layer at a
    time (ZeRO-3), or the offloaded states when they take more."""
    base, a, largest = counts.total, lora.adapter, counts.largest_layer
    n = gpus_per_node * nodes
    rows = []
    for o in model_states(counts, gpus_per_node, nodes):
        if o.stage < 3:
            frozen = 2 * base
            adapters = 4 * a if o.stage < 2 else 2 * a + (0 if o.offload_optimizer else 2 * a // n)
            loaded = 4 * (base + a) * gpus_per_node
        else:
            frozen = 2 * largest + (0 if o.offload_params else 2 * base // n)  # no gradient for the gathered layer
            adapters = 0 if o.offload_params else (2 if o.offload_optimizer else 4) * a // n
            loaded = 4 * largest * gpus_per_node
        optimizer = 0 if o.offload_optimizer else 16 * a // (1 if o.stage == 0 else n)
        offloaded = ((16 * a if o.offload_optimizer else 0) + (2 * (base + a) if o.offload_params else 0)) // nodes
        host = 4 * a // nodes if o.nvme else offloaded  # NVMe: the host keeps the fp32 gradient partitions
        rows.append(LoraStatesOption(o.name, o.stage, o.offload_optimizer, o.offload_params, o.zero_init,
                                     frozen + adapters + optimizer, int(max(loaded, host) * BUFFER_FACTOR), o.nvme,
                                     offloaded if o.nvme else 0, frozen, adapters, optimizer))
    return rows


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


def norm_weight_values_per_token(cfg: ModelConfig) -> int:
    """Of those, the values a block's norms keep only for their weights' gradients (their normalized input):
    LoRA, which freezes the norms, keeps none of them."""
    return 2 * cfg.dim + (cfg.dim + cfg.n_kv_heads * cfg.head_size if cfg.qk_norm else 0)


@dataclass(frozen=True)
class Activations:
    blocks: int  # bytes per micro-batch, without activation checkpointing
    blocks_checkpointed: int  # with it: the blocks' inputs plus one block recomputed
    logits: int

    def total(self, checkpointing: bool) -> int:
        return (self.blocks_checkpointed if checkpointing else self.blocks) + self.logits


def adapter_bytes_per_token(lora: LoraCounts, bytes_per_value: int = 2) -> dict[str, int]:
    """What the adapters keep for backward per token, by block ('layers.3'; '' for layers outside the blocks): each
    its r-wide inner value, and with dropout its dropped input and the dropout's mask."""
    kept: dict[str, int] = {}
    for name, n_in, _ in lora.layers:
        block = ".".join(name.split(".")[:2]) if name.startswith("layers.") else ""
        dropped = n_in * (bytes_per_value + 1) if lora.dropout else 0
        kept[block] = kept.get(block, 0) + lora.r * bytes_per_value + dropped
    return kept


def head_bytes(tokens: int, vocab_size: int, bytes_per_value: int = 2, fused: bool = True) -> int:
    """What the loss's head needs for a micro-batch of `tokens`. From the whole logits: the logits and their fp32
    log-softmax. Chunked (`fused_loss`, model/head_loss.py): per token its label (int64), its mask and its fp32
    log-sum-exp, kept for the backward pass, plus one chunk's fp32 logits, probabilities and their gradient in the
    model's dtype while that chunk is computed (a batch of one chunk keeps those logits)."""
    from astrai_ds.model.head_loss import chunk_tokens

    if not fused:
        return tokens * vocab_size * (bytes_per_value + 4)
    return tokens * (8 + 1 + 4) + min(tokens, chunk_tokens(vocab_size)) * vocab_size * (4 + 4 + bytes_per_value)


def activations(cfg: ModelConfig, micro_batch: int, seq_len: int, bytes_per_value: int = 2,
                lora: LoraCounts | None = None, fused: bool = True) -> Activations:
    tokens = micro_batch * seq_len
    values = block_values_per_token(cfg) - (norm_weight_values_per_token(cfg) if lora else 0)
    block = tokens * values * bytes_per_value
    inputs = tokens * cfg.dim * bytes_per_value * cfg.n_layers
    logits = head_bytes(tokens, int(cfg.vocab_size), bytes_per_value, fused)
    kept = adapter_bytes_per_token(lora, bytes_per_value) if lora else {}
    outside = kept.pop("", 0)  # adapters outside the blocks keep theirs with or without checkpointing
    adapters = tokens * (outside + sum(kept.values()))
    adapters_checkpointed = tokens * (outside + max(kept.values(), default=0))  # one block recomputed at a time
    return Activations(block * cfg.n_layers + adapters, inputs + block + adapters_checkpointed, logits)


def plan(cfg: ModelConfig, gpus_per_node: int, nodes: int, micro_batch: int, seq_len: int, gpu_memory: int,
         checkpointing: bool, bytes_per_value: int = 2, lora: LoraCounts | None = None, fused: bool = True) -> dict:
    """Everything `astrai-ds plan` prints, as a JSON-ready dict (bytes); with `lora`, for a LoRA run; `fused`: the
    train config's fused_loss (the head's share in chunks)."""
    counts = param_counts(cfg)
    act = activations(cfg, micro_batch, seq_len, bytes_per_value, lora, fused)
    usable = int(gpu_memory * 0.9)  # leave a tenth for the CUDA context, communication buffers and fragmentation
    options = lora_states(counts, lora, gpus_per_node, nodes) if lora else model_states(counts, gpus_per_node, nodes)
    rows = []
    for option in options:
        need = option.gpu_bytes + act.total(checkpointing)
        rows.append({**asdict(option), "activations": act.total(checkpointing), "gpu_total": need,
                     "fits": need <= usable})
    return {"params": asdict(counts), "gpus": gpus_per_node * nodes, "gpus_per_node": gpus_per_node, "nodes": nodes,
            "micro_batch": micro_batch, "seq_len": seq_len, "activation_checkpointing": checkpointing,
            "bytes_per_value": bytes_per_value, "gpu_memory": gpu_memory, "usable_gpu_memory": usable,
            "activations": asdict(act), "fused_loss": fused, "options": rows,
            "lora": {"r": lora.r, "target": lora.target, "dropout": lora.dropout, "adapter_params": lora.adapter,
                     "frozen_params": counts.total, "layers": len(lora.layers)} if lora else None}
