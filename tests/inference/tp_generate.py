"""Started by tests/inference/test_tp.py on 2 ranks: load a model folder, shard it with
`tensor_parallel`, and write (every rank) OUT/rank{R}.json with the full-forward logits of a fixed batch and the
greedy tokens the generation engine gives for fixed prompts (`CASES`, shared with the test's unsharded run)."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from astrai_ds.inference.ds_inference import DTYPES, close_distributed, init_inference_distributed, tensor_parallel
from astrai_ds.inference.engine import EngineConfig, LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.model.io import load_model_folder


def batch_ids(vocab_size: int) -> torch.Tensor:
    """The (2, 24) batch whose logits are compared."""
    return torch.randint(16, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def prompts(vocab_size: int) -> list:
    """Prompts of different lengths (token ids, and one text) stepped together through the engine."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(16, vocab_size, (n,), generator=g).tolist() for n in (3, 11, 29)]
    return ids + ["The quick brown fox"]


def run_cases(model, tokenizer) -> dict:
    """Full-forward logits and greedy engine tokens of `model` (sharded or not)."""
    vocab = model.cfg.vocab_size
    with torch.inference_mode():
        logits = model(batch_ids(vocab)).float()  # (2, 24, vocab)
    engine = LLMEngine(model, tokenizer, EngineConfig(seed=0, block_size=8, kv_cache_tokens=512,
                                                      max_num_batched_tokens=32))
    done = engine.generate_batch(prompts(vocab), SamplingParams(temperature=0.0, max_new_tokens=10))
    return {"logits": logits.tolist(), "tokens": [c.token_ids for c in done], "texts": [c.text for c in done],
            "errors": [c.error for c in done]}


def shm_all_reduce() -> bool:
    """Whether DeepSpeed's inference all-reduce takes its shared-memory kernel here (it crashes without LOCAL_SIZE)."""
    from deepspeed.comm import comm as ds_comm

    return (hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
            and getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) >= 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = p.parse_args()

    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 2)

    rank, world = init_inference_distributed()
    seconds = {"init": lap()}
    model, tokenizer = load_model_folder(args.model)
    seconds["load"] = lap()
    model = tensor_parallel(model, args.tp, DTYPES[args.dtype])
    seconds["shard"] = lap()
    attention = model.layers[0].attention
    result = run_cases(model, tokenizer)
    seconds["run"] = lap()
    result.update(rank=rank, world=world, wq_rows=attention.wq.weight.shape[0], wk_rows=attention.wk.weight.shape[0],
                  w1_rows=model.layers[0].feed_forward.w1.weight.shape[0],
                  head_rows=model.head.output.weight.shape[0],
                  tied=model.head.output.weight is model.embed.tok_embeddings.weight,
                  local_size=os.environ.get("LOCAL_SIZE"), shm_all_reduce=shm_all_reduce(), seconds=seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    close_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo's threads can abort a finished rank


if __name__ == "__main__":
    main()
