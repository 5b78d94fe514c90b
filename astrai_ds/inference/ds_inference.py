"""Tensor-parallel inference with DeepSpeed-Inference (`deepspeed.init_inference`, AutoTP): the only module of
inference/ that imports DeepSpeed.

`tensor_parallel(model, tp_size, dtype)` shards every block of a Transformer over `tp_size` ranks and returns
the same Transformer object, so the generation engine calls `.hidden`, `.head` and `.cfg` as before:

- column-parallel (each rank keeps a slice of the output features, no communication): `attention.wq/wk/wv`,
  `feed_forward.w1/w3`. Each rank keeps n_heads / tp query heads and the n_kv_heads / tp key/value heads
  they share, so grouped-query attention runs locally, and the KV cache is sized from the local wk.
- row-parallel (a slice of the input features, then an all-reduce of the output): `attention.wo`,
  `feed_forward.w2`. That is two all-reduces per block and per forward.
- replicated, whole on every rank: the embedding, the norms and the output head. AutoTP only rewrites the
  blocks it is given and a top-level `lm_head` (ours is `head.output`), so the logits are whole on every
  rank and every rank samples the same token, with no gather. A tied embedding stays tied.

Every rank must then run the same requests with the same seeds, or the all-reduces pair up the wrong steps.

Kernel injection (`replace_with_kernel_inject=True`, DeepSpeed's fused CUDA kernels) needs a DeepSpeed policy
for the block's class, which exists for Hugging Face models only; DeepSpeed refuses it together with an
`injection_policy`. So this path never injects kernels, on GPUs either: the sharded layers are plain matmuls
with NCCL (GPU) or shared-memory/gloo (CPU) all-reduces. For fused kernels on GPUs, export the model (a
Hugging Face Llama folder) and serve it with DeepSpeed-FastGen or vLLM.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from astrai_ds.errors import UserError
from astrai_ds.launch_env import launched, local_world_size, set_world_of_one, unlink_shm_buffers
from astrai_ds.model.block import Block

# AutoTP makes every nn.Linear of a block column-parallel except these, which become row-parallel. The names
# are relative to the block (`Block`) and must match exactly.
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def launch_hint(tp_size: int, command: str = "generate") -> str:
    """How to start `COMMAND --tp N` (DeepSpeed's launcher takes `--module`, not `-m`)."""
    return (f"start {tp_size} processes, one per tensor-parallel rank: `deepspeed --num_gpus {tp_size} --module "
            f"astrai_ds {command} --tp {tp_size} ...` (on a machine without GPUs the launcher starts {tp_size} CPU "
            f"processes; `torchrun --nproc_per_node {tp_size} -m astrai_ds {command} --tp {tp_size} ...` works too)")


def check_tensor_parallel(cfg, tp_size: int, dtype: torch.dtype, world_size: int | None = None,
                          supported_dtypes: list[torch.dtype] | None = None) -> None:
    """Raise UserError when `tp_size` cannot shard a model of ModelConfig `cfg`: tp_size must divide the query and
    key/value heads, equal the number of processes (`world_size`, when known) and the dtype must be one the
    accelerator runs (`supported_dtypes`, when given)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise UserError(f"--tp must be a positive integer, got {tp_size!r}")
    if cfg.n_kv_heads % tp_size or cfg.n_heads % tp_size:
        divisors = [d for d in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % d == 0]
        raise UserError(f"--tp {tp_size} does not divide the model's heads (n_heads {cfg.n_heads}, n_kv_heads "
                        f"{cfg.n_kv_heads}): each rank must hold whole key/value heads with their query heads; "
                        f"use --tp {' or '.join(map(str, divisors))}")
    if supported_dtypes is not None and dtype not in supported_dtypes:
        names = {v: k for k, v in DTYPES.items()}
        ok = " or ".join(names.get(d, str(d)) for d in supported_dtypes)
        raise UserError(f"DeepSpeed-Inference does not run {names.get(dtype, dtype)} on this machine's accelerator "
                        f"({_device_name()}): use {ok}")
    if world_size is not None and world_size != tp_size:
        raise UserError(f"--tp {tp_size} needs exactly {tp_size} processes, but {world_size} were started "
                        f"(data-parallel replicas of a tensor-parallel model are not supported); "
                        f"{launch_hint(tp_size)}")


def _device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _require_transformers() -> None:
    # AutoTP imports transformers while it shards (to recognise GPT-2's Conv1D), even for a plain nn.Module.
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("tensor-parallel inference uses DeepSpeed's AutoTP, which needs the `transformers` package: "
                        "pip install 'astrai_ds[hf]'") from None


def init_inference_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs) for tensor-parallel inference
    and return (rank, world_size). Without a launcher (plain `python`), a world of one. Idempotent.

    On CPUs, DeepSpeed's all-reduce for inference is a shared-memory kernel that it sets up only when LOCAL_SIZE
    equals the world size; the `deepspeed` launcher sets LOCAL_SIZE, torchrun and mpirun do not, and an
    all-reduce through the kernel without the set-up crashes the process. So LOCAL_SIZE is filled in here from
    the launcher's own variable before the first collective, and where the ranks span several hosts the kernel
    is switched off in favour of gloo.
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.comm import comm as ds_comm

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not launched():
        set_world_of_one()
    if "LOCAL_SIZE" not in os.environ and local_world_size() is not None:
        os.environ["LOCAL_SIZE"] = str(local_world_size())
    deepspeed.init_distributed(verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    cdb = ds_comm.cdb
    if world > 1 and getattr(cdb, "shm_comm_op", None) is not None and os.environ.get("LOCAL_SIZE") != str(world):
        cdb.shm_vector_kernel_level = 0  # DeepSpeed's own gate: level 0 sends inference_all_reduce to gloo
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    unlink_shm_buffers(rank, world)
    return rank, world


def close_distributed() -> None:
    """Wait for every rank, then tear the process group down (a no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def tensor_parallel(model: torch.nn.Module, tp_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """Shard a Transformer's blocks over `tp_size` ranks (see the module docstring) and cast it to `dtype`;
    returns the same Transformer, sharded, in eval mode, on this rank's device.

    Call it on every rank with the same weights (each rank loads the whole model, then keeps its shard). The
    process group is initialised here when the caller has not done so (`init_inference_distributed`); its size
    must equal tp_size. tp_size 1 only casts the model: no DeepSpeed, no process group. On CPUs DeepSpeed runs
    bf16 and fp32 only (fp16 where the CPU has fp16 matmuls). Raises UserError for a tp_size that does not divide
    the heads, a dtype the accelerator does not run, a wrong number of processes, or a missing `transformers`.
    """
    from deepspeed.accelerator import get_accelerator

    cfg = model.cfg
    check_tensor_parallel(cfg, tp_size, dtype, supported_dtypes=get_accelerator().supported_dtypes())
    if tp_size == 1:
        return model.to(dtype).eval()
    _require_transformers()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) and not launched():
        raise UserError(f"--tp {tp_size} runs on {tp_size} processes and this is a single one; {launch_hint(tp_size)}")
    _, world = init_inference_distributed()
    check_tensor_parallel(cfg, tp_size, dtype, world_size=world)
    return _shard(model.eval(), tp_size, dtype)


def _shard(model: torch.nn.Module, tp_size: int, dtype: torch.dtype) -> torch.nn.Module:
    import deepspeed

    cfg = model.cfg
    # AutoTP reads the head counts from `model.config` (Hugging Face's names) to split q/k/v by whole key/value
    # heads; the attribute lives only while it shards.
    model.config = SimpleNamespace(num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                   hidden_size=cfg.dim)
    try:
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype,
                                          injection_policy={Block: ROW_PARALLEL}, replace_with_kernel_inject=False)
    finally:
        del model.config
    sharded = engine.module
    for block in sharded.layers:
        attention = block.attention
        # AutoTP divides `n_heads` (a name it knows) but not `n_kv_heads`: make both this rank's counts. The
        # forward reads the counts from the weights' shapes; these are for whoever inspects the module.
        attention.n_heads = attention.wq.weight.shape[0] // attention.head_dim
        attention.n_kv_heads = attention.wk.weight.shape[0] // attention.head_dim
    return sharded.eval()
