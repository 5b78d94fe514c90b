#!/usr/bin/env python
"""Generation speed: our engine (paged KV cache, continuous batching, prefix reuse) against Hugging Face
`transformers`' `generate` on the same weights, in one run.

The model is the `small` preset (configs/model/small.json) with random weights from a fixed seed, in bf16
by default, with a 2048-token tokenizer trained on the built-in corpus; it is written once as a model folder
(`save_model_folder`, the folder `astrai-ds export` writes), and both sides load that folder: ours with
`load_model_folder`, theirs with `AutoModelForCausalLM.from_pretrained`. Random weights make no difference to
speed; every request asks for a fixed number of new tokens (`ignore_eos` on our side, `min_new_tokens` on
theirs), all greedy.

  batch 1        one prompt of --prompt-len tokens, --new-tokens new ones: time to first token (TTFT) and
                 decode tokens/s after the first token. Theirs: TTFT is a `generate(max_new_tokens=1)`.
  mixed 16       16 requests with prompts of 16-200 tokens and 16-128 new tokens (seeded): ours all at once
                 through `generate_batch` (continuous batching); theirs as static batches of --static-batch
                 requests in arrival order, left-padded, each batch running until its longest request is done.
                 Tokens/s counts the tokens the requests asked for, on both sides.
  prefix         TTFT of a request whose 200-token prompt prefix is already in the prefix cache, against the
                 same request on an empty cache (different prefixes each round, so nothing else is reused).
  bound          batch-1 decode reads every weight once per token: the bound is a copy bandwidth measured in
                 this run (a 512 MiB tensor copy, read + write bytes) over the weight bytes.
  --compile      adds `ours+compile`: a second engine over the same weights with compiled decode steps
                 (EngineConfig.compile); its two graphs are compiled in a warm-up (`warm_up`) before anything is
                 timed (the time is reported apart), and its greedy tokens are compared with the eager engine's.

    .venv/bin/python benchmarks/generate.py                      # small, bf16, everything
    .venv/bin/python benchmarks/generate.py --dtype fp32 --json out.json
    .venv/bin/python benchmarks/generate.py --model configs/model/tiny.json --new-tokens 16 --rounds 1   # smoke test
    .venv/bin/python benchmarks/generate.py --model models/smollm2 --dtype fp32   # a real model folder
    .venv/bin/python benchmarks/generate.py --model models/smollm2 --compile      # with compiled decode steps

Run it on a quiet machine: every measurement uses all cores.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import announce, arg_parser  # noqa: E402  (benchmarks/machine.py)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_folder(work: Path, model_config: Path, dtype: torch.dtype) -> Path:
    """corpus -> tokenizer -> random model of `model_config` -> model folder, each made once in `work`; a model
    folder given as `model_config` (a pretrained model: an imported GGUF, a Hugging Face folder) is used as it is."""
    if model_config.is_dir():
        return model_config
    from astrai_ds.config.model import ModelConfig
    from astrai_ds.data.corpus import write_corpus
    from astrai_ds.data.tokenizer import Tokenizer, train_tokenizer
    from astrai_ds.model import Transformer
    from astrai_ds.model.io import save_model_folder

    folder = work / f"model_{model_config.stem}_{str(dtype).split('.')[-1]}"
    if (folder / "model.safetensors").exists():
        return folder
    if not (work / "tokenizer" / "tokenizer.json").exists():
        write_corpus(work / "corpus", seed=0, scale=0.25)
        train_tokenizer([work / "corpus" / "pretrain.jsonl"], 2048, work / "tokenizer", progress=False)
    tokenizer = Tokenizer.load(work / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.load(model_config).resolved(tokenizer.vocab_size)).to(dtype)
    save_model_folder(model, tokenizer, folder)
    return folder


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of a 512 MiB tensor copy (read + write), the best of `repeats`."""
    src = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix counted once


def random_prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(16, vocab, (n - 1,), generator=g).tolist()  # <bos> first


# ---------------------------------------------------------------- ours


def ours_batch1(engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s after the first token)."""
    from astrai_ds.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.blocks.reset_prefix_cache()
    t0 = time.perf_counter()
    first, count = None, 0
    for out in engine.stream(prompt, params):
        count += len(out.token_ids)
        if first is None and out.token_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    assert count == new_tokens, count
    return first - t0, (count - 1) / (end - first)


def ours_mixed(engine, prompts, new_tokens) -> float:
    from astrai_ds.inference.sampling import SamplingParams

    engine.blocks.reset_prefix_cache()
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in new_tokens]
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params)
    elapsed = time.perf_counter() - t0
    assert [c.completion_tokens for c in outs] == list(new_tokens)
    return sum(new_tokens) / elapsed


def ours_prefix(engine, shared_len: int, vocab: int, rounds: int) -> tuple[float, float]:
    """Median TTFT (cold, warm) of a request with a `shared_len`-token prefix: cold on an empty prefix cache,
    warm right after another request with the same prefix."""
    from astrai_ds.inference.sampling import SamplingParams

    one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    cold, warm = [], []
    for r in range(rounds):
        engine.blocks.reset_prefix_cache()
        shared = random_prompt(shared_len, 1000 + r, vocab)
        for times, suffix_seed in ((cold, 1), (warm, 2)):
            t0 = time.perf_counter()
            out = engine.generate(shared + random_prompt(9, suffix_seed + 10 * r, vocab)[1:], one)
            times.append(time.perf_counter() - t0)
        assert out.cached_tokens >= shared_len - engine.blocks.block_size, out.cached_tokens
    return statistics.median(cold), statistics.median(warm)


# ---------------------------------------------------------------- transformers


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding, as transformers wants for generation
        ids[row, T - len(p):] = torch.tensor(p)
        mask[row, T - len(p):] = 1
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)[:, T:]


def hf_batch1(model, prompt, new_tokens, pad_id) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    hf_generate(model, [prompt], 1, pad_id)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = hf_generate(model, [prompt], new_tokens, pad_id)
    total = time.perf_counter() - t0
    return ttft, (new_tokens - 1) / (total - ttft), out[0].tolist()


def hf_mixed(model, prompts, new_tokens, batch: int, pad_id: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        hf_generate(model, prompts[start:start + batch], max(new_tokens[start:start + batch]), pad_id)
    return sum(new_tokens) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- main


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "configs/model/small.json",
                   help="model config to build with random weights, or a model folder to load (e.g. SmolLM2 imported "
                        "with `astrai-ds import`)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations")
    p.add_argument("--prompt-len", type=int, default=32, help="batch-1 prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="batch-1 new tokens")
    p.add_argument("--static-batch", type=int, default=8, help="transformers' static batch size for the 16 requests")
    p.add_argument("--rounds", type=int, default=3, help="repeat each measurement; medians are reported")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the corpus, tokenizer and model folder here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--compile", action="store_true", help="also measure our engine with compiled decode steps")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    machine = announce(("transformers",))

    import transformers
    from transformers import AutoModelForCausalLM

    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.model.io import load_model_folder

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_generate_"))
    work.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    folder = build_folder(work, args.model, dtype)
    model, tokenizer = load_model_folder(folder, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    vocab, pad = model.cfg.vocab_size, tokenizer.pad_id
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=16, max_num_batched_tokens=512))
    engines = {"ours": engine}
    if args.compile:
        from astrai_ds.extensions import use_compile_cache

        use_compile_cache()
        engines["ours+compile"] = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=16, max_num_batched_tokens=512,
                                                                           compile=True))

    prompt = random_prompt(args.prompt_len, 0, vocab)
    g = torch.Generator().manual_seed(1)
    mixed_prompts = [random_prompt(int(n), 100 + i, vocab)
                     for i, n in enumerate(torch.randint(16, 201, (16,), generator=g))]
    mixed_new = [min(int(n), model.cfg.max_seq_len - len(p))  # within the context (tiny's is 256)
                 for n, p in zip(torch.randint(16, 129, (16,), generator=g), mixed_prompts)]

    # warm-up: the first calls of each side allocate and pick kernels; the compiled engine compiles its graphs
    compile_seconds = None
    for name, e in engines.items():
        t0 = time.perf_counter()
        e.warm_up()
        if name == "ours+compile":
            compile_seconds = time.perf_counter() - t0
            print(f"ours+compile: compiling {sorted(e.runner.compiled.seen)} took {compile_seconds:.0f} s", flush=True)
        ours_batch1(e, prompt, 8)
    hf_batch1(hf, prompt, 8, pad)

    sides = [*engines, "transformers"]
    rows = {side: {"ttft": [], "decode": [], "mixed": []} for side in sides}
    agreement = {}
    for _ in range(args.rounds):  # interleaved, so drifting machine speed hits every side alike
        for name, e in engines.items():
            ttft, decode = ours_batch1(e, prompt, args.new_tokens)
            rows[name]["ttft"].append(ttft)
            rows[name]["decode"].append(decode)
        ttft, decode, hf_tokens = hf_batch1(hf, prompt, args.new_tokens, pad)
        rows["transformers"]["ttft"].append(ttft)
        rows["transformers"]["decode"].append(decode)
        if not agreement:
            from astrai_ds.inference.sampling import SamplingParams

            greedy = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
            tokens = {name: e.generate(prompt, greedy).token_ids for name, e in engines.items()}
            pairs = [("ours", "transformers")] + [(name, "ours") for name in engines if name != "ours"]
            tokens["transformers"] = hf_tokens
            for a, b in pairs:
                same = sum(x == y for x, y in zip(tokens[a], tokens[b]))
                first_diff = next((i for i, (x, y) in enumerate(zip(tokens[a], tokens[b])) if x != y), None)
                agreement[f"{a} vs {b}"] = {"equal_tokens": same, "of": args.new_tokens, "first_difference": first_diff}
        for name, e in engines.items():
            rows[name]["mixed"].append(ours_mixed(e, mixed_prompts, mixed_new))
        rows["transformers"]["mixed"].append(hf_mixed(hf, mixed_prompts, mixed_new, args.static_batch, pad))
    same_tokens = agreement["ours vs transformers"]
    cold, warm = ours_prefix(engine, 200, vocab, max(args.rounds, 3))
    bandwidth = copy_bandwidth()
    bound = bandwidth / weight_bytes(model)
    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in rows.items()}

    result = {
        "machine": machine,
        "model": {"config": args.model.name, "dtype": args.dtype, "params": sum(p.numel() for p in model.parameters()),
                  "weight_bytes": weight_bytes(model)},
        "batch1": {"prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, **{
            side: {"ttft_ms": 1000 * med[side]["ttft"], "decode_tokens_per_s": med[side]["decode"]} for side in med}},
        "greedy_agreement": same_tokens,
        "greedy_agreement_all": agreement,
        "compile_warmup_seconds": compile_seconds,
        "mixed16": {"new_tokens": sum(mixed_new), "static_batch": args.static_batch,
                    **{side: {"tokens_per_s": med[side]["mixed"]} for side in med}},
        "prefix": {"shared_tokens": 200, "ttft_cold_ms": 1000 * cold, "ttft_warm_ms": 1000 * warm,
                   "speedup": cold / warm},
        "bound": {"copy_bandwidth_GBps": bandwidth / 1e9, "decode_bound_tokens_per_s": bound,
                  "ours_share_of_bound": med["ours"]["decode"] / bound},
        "preemptions": engine.scheduler.num_preemptions,
    }
    o, t = med["ours"], med["transformers"]
    print(f"model {args.model.name} ({result['model']['params'] / 1e6:.1f}M params, {args.dtype}), "
          f"{result['machine']['cores']} cores, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'':28}" + "".join(f"{name:>14}" for name in sides)
          + "".join(f"{name + '/theirs':>22}" for name in engines))
    rows_out = (("batch-1 decode tokens/s", "decode", 1, True), ("batch-1 TTFT ms", "ttft", 1000, False),
                ("16 mixed requests tokens/s", "mixed", 1, True))
    for label, key, scale, higher in rows_out:
        ratios = [med[name][key] / t[key] if higher else t[key] / med[name][key] for name in engines]
        print(f"{label:28}" + "".join(f"{scale * med[name][key]:14.1f}" for name in sides)
              + "".join(f"{r:22.2f}" for r in ratios))
    print(f"(theirs: static batches of {args.static_batch} for the 16 mixed requests; TTFT ratios: theirs / ours)")
    print(f"prefix cache: TTFT with a 200-token cached prefix {1000 * warm:.1f} ms against {1000 * cold:.1f} ms "
          f"cold ({cold / warm:.1f}x)")
    print(f"batch-1 bound: copy bandwidth {bandwidth / 1e9:.1f} GB/s / {weight_bytes(model) / 1e6:.1f} MB of weights "
          f"= {bound:.0f} tokens/s; ours reaches {100 * o['decode'] / bound:.0f}%")
    for pair, a in agreement.items():
        print(f"greedy tokens equal, {pair}: {a['equal_tokens']}/{a['of']}")
    if "ours+compile" in med:
        print(f"batch-1 decode, ours+compile reaches {100 * med['ours+compile']['decode'] / bound:.0f}% of the bound")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
