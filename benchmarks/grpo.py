#!/usr/bin/env python
"""GRPO's rollouts: tokens/s of our generation engine inside the training loop against Hugging Face
`transformers`' `generate` (static batches) making the same rollouts from the same model folder, in one run.

  in the loop     `python train.py` (one rank) trains --steps GRPO steps from the model folder (--config, by default
                  configs/train/grpo_tiny.json, with stage.init_from and the tokenizer set to --model, data.path to
                  --data, a metrics.jsonl line per step). Each step's `grpo/rollout_tokens_per_sec` (generated tokens,
                  stop tokens included, over the seconds of the rollout's engine run: its engine's construction and
                  `generate_batch`), `grpo/rollout_seconds` (the whole rollout: the weights copied into the inference
                  copy, generation, rewards, advantages) and `grpo/train_seconds` (the rest of the step: forward,
                  backward, optimizer) are read back. The first step is left out: it builds the inference copy.
  ours alone      the same prompts in the same order (the run's own sampler, seed and shuffle), group_size completions
                  each with the run's per-completion seeds, through the same code the loop runs
                  (`RolloutBatches._generate`: the engine sized per rollout, one `generate_batch`), on the model
                  folder loaded with `load_model_folder`: the loop's generation without the loop.
  transformers    `AutoModelForCausalLM.from_pretrained` on the same folder, `generate(do_sample=True)` with the same
                  temperature and top_p (top_k off, as ours), max_new_tokens and stop ids, on static batches: each
                  step's prompts x group_size rows, left-padded (or --hf-batch rows at a time), each batch running
                  until its longest completion is done. Tokens/s counts only the real tokens, each completion's up
                  to and including its stop token, as the loop's metric does.

`--breakdown` times, over the measured steps outside the loop, what one forward of each side costs: ours, the
model's forward (`hidden` and the head), the model runner's work around it (the step's slots, attention groups and
masks as tensors) and sampling (the rows together, each drawing from its own generator); theirs, the model's forward
(its cache update included) and the rest of `generate` (inputs, logits processors, sampling, stopping criteria).
With grpo.compile_rollouts our model and runner are timed together: a decode step runs them in one compiled graph.

All three run in the training's dtype (the run's resolved precision: bf16 where the CPU has native bf16, "auto") with
the same number of threads and the trainer's allocator setting (cpu.keep_freed_memory). The two sides outside the
loop run the loop's measured steps interleaved, step by step, after one warm-up step each (--rounds repeats them with
the same seeds, so the same completions: it evens out the timing, more --steps sample more). Each side draws its own
random numbers, and the loop's policy moves a little each step, so the three sides' completions are samples of nearly
the same distribution, not the same tokens: the mean completion length of each side is printed beside its tokens/s.
A batch lasts as long as its longest completion on both sides, so that tail moves the ratios by some percent between
samples; --breakdown's time per forward does not depend on it.

    .venv/bin/python benchmarks/grpo.py                                   # after scripts/quickstart.sh
    .venv/bin/python benchmarks/grpo.py --steps 21 --rounds 3 --json /tmp/grpo.json
    .venv/bin/python benchmarks/grpo.py --model runs/quickstart/models/sft --set grpo.max_new_tokens=64

One rank only: on more ranks the loop's metric is the sum of the ranks' rates, each on its share of the cores,
and the other two sides would need as many processes. Run it on a quiet machine: every side uses all its threads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import ForeignLoad, announce, arg_parser  # noqa: E402  (benchmarks/machine.py)
from train_throughput import run_train  # noqa: E402  (train.py in the trainer's environment: venv, DeepSpeed's ops)


def parse_args(argv=None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=Path("runs/quickstart/models/dpo"),
                   help="model folder (`astrai-ds export`'s): the policy's initial weights and the tokenizer "
                        "(default: %(default)s)")
    p.add_argument("--data", type=Path, default=Path("runs/quickstart/corpus/grpo.jsonl"),
                   help="GRPO prompts with their answers (default: %(default)s)")
    p.add_argument("--config", type=Path, default=Path("configs/train/grpo_tiny.json"),
                   help="train config: the grpo section, batch shape, seed (default: %(default)s)")
    p.add_argument("--ds-config", default="zero2.json", help="DeepSpeed config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=11, help="GRPO steps to train; the first is left out (default: 11)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the run's precision; the other sides follow what it resolved to (default: auto)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="more train config overrides (e.g. grpo.max_new_tokens=64); every side reads the run's "
                        "resolved config")
    p.add_argument("--hf-batch", type=int, default=None,
                   help="transformers' static batch in rows (default: one step's prompts x group_size)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the measured steps outside the loop this many times, pooled (default: 2)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each side's forwards, sampling and the rest per forward (outside the loop)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed for the training run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or (args.hf_batch is not None and args.hf_batch < 1):
        p.error("--steps must be at least 2 (the first is left out), --rounds and --hf-batch positive")
    for key in ("model", "data", "config", "work_dir", "json"):  # taken from where the script was started
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())
    if Path(args.ds_config).exists():
        args.ds_config = str(Path(args.ds_config).resolve())
    return args


# ---------------------------------------------------------------------------------------------- in the loop

def train(args, run_dir: Path, threads: int) -> None:
    """`python train.py` on one rank with `threads` threads; exits with the log's tail when the run fails."""
    sets = [f"stage.init_from={args.model}", f"tokenizer={args.model}", f"data.path={args.data}",
            f"output_dir={run_dir}", f"max_steps={args.steps}", "log_interval=1",  # a metrics line per step
            "save_interval=1000000000", "resume=none", f"precision={args.precision}", *args.overrides]
    run_train(args.config, args.ds_config, sets, run_dir.parent / "train.log", args.timeout,
              {"OMP_NUM_THREADS": str(threads)})


def loop_steps(run_dir: Path, completions: int) -> list[dict]:
    """Per logged step after the first: generated tokens, generation seconds (tokens / the step's tokens/s),
    rollout and train seconds, mean completion length."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("step", 0) < 2 or "grpo/rollout_tokens_per_sec" not in m:
            continue
        tokens = round(m["grpo/completion_length"] * completions)
        steps.append({"step": m["step"], "tokens": tokens, "generate_s": tokens / m["grpo/rollout_tokens_per_sec"],
                      "rollout_s": m["grpo/rollout_seconds"], "train_s": m["grpo/train_seconds"],
                      "tokens_per_s": m["grpo/rollout_tokens_per_sec"], "reward": m.get("grpo/reward")})
    return steps


# ------------------------------------------------------------------------------------- outside the loop

def rollout_batches(cfg, tokenizer, data: Path):
    """GRPO's rollout batches of one rank of the run, without a training engine: the run's prompts, sampler and
    seeds, for `_generate`."""
    from astrai_ds.data.chat import render_chat
    from astrai_ds.data.prompts import prompt_messages, read_prompt_records
    from astrai_ds.training.distributed import DistInfo
    from astrai_ds.training.rollout import RolloutBatches

    records = read_prompt_records(data)
    prompts = [render_chat(tokenizer, prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    return RolloutBatches(SimpleNamespace(device=torch.device("cpu")), None, tokenizer, records, prompts, cfg,
                          cfg.micro_batch_size, cfg.grad_accum_steps, DistInfo(0, 1, 0, 1), [], str(data))


def ours(batches, model, indices: list[int], rollout: int) -> tuple[list[int], float]:
    """(lengths, seconds) of one rollout of `indices` through the loop's own generation code."""
    batches.rollouts = rollout  # numbers the completions' seeds, as in the loop
    t0 = time.perf_counter()
    completions = batches._generate(model, indices)
    seconds = time.perf_counter() - t0
    return [len(c.token_ids) + (c.stop_token_id is not None) for c in completions], seconds


def hf_rows(batches, indices: list[int]) -> tuple[list[list[int]], list[int]]:
    """The rows of one rollout (each prompt group_size times) and each row's max_new_tokens, as the loop's."""
    g, rows = batches.grpo, []
    for index in indices:
        rows += [batches.prompts[index]] * g.group_size
    return rows, [min(g.max_new_tokens, batches.seq_len - len(r)) for r in rows]


def hf_generate(hf, rows: list[list[int]], limits: list[int], grpo, stop_ids: set[int], pad_id: int,
                batch: int) -> tuple[list[int], float]:
    """(lengths, seconds) of `rows` sampled by transformers in static batches of `batch` rows, left-padded; a length
    counts a completion's tokens up to and including its stop token (or up to its own limit)."""
    lengths, seconds = [], 0.0
    for start in range(0, len(rows), batch):
        chunk, chunk_limits = rows[start:start + batch], limits[start:start + batch]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(chunk_limits), do_sample=True,
                              temperature=grpo.temperature, top_p=grpo.top_p, top_k=0, eos_token_id=sorted(stop_ids),
                              pad_token_id=pad_id)[:, T:]
        seconds += time.perf_counter() - t0
        for row, limit in zip(out.tolist(), chunk_limits):
            stop = next((i for i, t in enumerate(row[:limit]) if t in stop_ids), None)
            lengths.append(limit if stop is None else stop + 1)
    return lengths, seconds


class Timers:
    """--breakdown: seconds and calls of the functions a generation step spends its time in."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, owner, name: str, key: str) -> None:
        """Replace `owner.name` (a function of a module, a class or an instance) by a timed call of it."""
        f = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def per_forward(self, sides: dict) -> dict:
        """Milliseconds per forward of each side: ours split into model, runner, sampling and the rest (scheduler,
        detokenizer, the engine's construction); theirs into model and the rest of `generate`."""
        n, m = self.calls["ours.run"], self.calls["transformers.forward"]
        ours_s, theirs_s = sides["ours"][1], sides["transformers"][1]
        run, sample = self.seconds["ours.run"], self.seconds["ours.sample"]
        model = self.seconds["ours.model"] + self.seconds["ours.head"] if self.calls["ours.model"] else None
        return {"ours": {"forwards": n, "model_ms": model and 1e3 * model / n,
                         "runner_ms": 1e3 * (run - (model or 0)) / n,
                         "sampling_ms": 1e3 * sample / n, "rest_ms": 1e3 * (ours_s - run - sample) / n,
                         "total_ms": 1e3 * ours_s / n},
                "transformers": {"forwards": m, "model_ms": 1e3 * self.seconds["transformers.forward"] / m,
                                 "rest_ms": 1e3 * (theirs_s - self.seconds["transformers.forward"]) / m,
                                 "total_ms": 1e3 * theirs_s / m}}


def print_breakdown(b: dict, rollouts: int) -> None:
    o, t = b["ours"], b["transformers"]
    print(f"forwards per rollout: ours {o['forwards'] / rollouts:.1f}, transformers {t['forwards'] / rollouts:.1f}")
    model = (f"model {o['model_ms']:.2f} + runner {o['runner_ms']:.2f}" if o["model_ms"] is not None else
             f"model and runner {o['runner_ms']:.2f} (compiled decode steps)")
    print(f"per forward (ms), outside the loop: ours {o['total_ms']:.2f} over {o['forwards']} forwards = "
          f"{model} + sampling {o['sampling_ms']:.2f} + the rest "
          f"{o['rest_ms']:.2f}; transformers {t['total_ms']:.2f} over {t['forwards']} forwards = model "
          f"{t['model_ms']:.2f} + the rest of generate {t['rest_ms']:.2f}")


# ------------------------------------------------------------------------------------------------ report

def pooled(lengths: list[int], seconds: float) -> dict:
    tokens = sum(lengths)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mean_length": tokens / max(len(lengths), 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from astrai_ds.training.cpu import keep_freed_memory

    keep_freed_memory()  # the trainer's allocator (cpu.keep_freed_memory), so all three sides run on the same one
    threads = torch.get_num_threads()  # the run gets as many (OMP_NUM_THREADS)
    machine = announce(("transformers",))
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is not a model folder (no config.json): run scripts/quickstart.sh, or pass --model "
                 f"with a folder `astrai-ds export` wrote")

    import transformers
    from transformers import AutoModelForCausalLM

    from astrai_ds.config.train import TrainConfig
    from astrai_ds.model.io import load_model_folder

    tmp = None if args.work_dir else tempfile.mkdtemp(prefix="bench_grpo_")
    work = args.work_dir or Path(tmp)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        t0, load = time.perf_counter(), ForeignLoad()
        train(args, run_dir, threads)
        train_wall, train_load = time.perf_counter() - t0, load.share()
        cfg = TrainConfig.load(run_dir / "train_config.json")  # what the run resolved, overrides included
        bf16 = json.loads((run_dir / "ds_config.json").read_text())["bf16"]["enabled"]
        per_step = cfg.micro_batch_size * cfg.grad_accum_steps  # completions a step (one rank)
        loop = loop_steps(run_dir, per_step)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"training run: {args.steps} steps in {train_wall:.0f}s wall", flush=True)

    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tokenizer = load_model_folder(args.model, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    batches = rollout_batches(cfg, tokenizer, args.data)
    indices = [batches.sampler.next_indices() for _ in range(args.steps)]  # the run's prompts, step by step
    hf_batch = args.hf_batch or per_step
    stop_ids, pad_id = set(tokenizer.stop_ids), tokenizer.pad_id

    def hf_step(step: int) -> tuple[list[int], float]:
        torch.manual_seed(cfg.seed + step)
        return hf_generate(hf, *hf_rows(batches, indices[step]), cfg.grpo, stop_ids, pad_id, hf_batch)

    def ours_step(step: int) -> tuple[list[int], float]:
        return ours(batches, model, indices[step], step)

    timers = Timers()
    if args.breakdown:
        import astrai_ds.inference.engine as engine_module
        from astrai_ds.inference.model_runner import ModelRunner

        timers.wrap(ModelRunner, "run", "ours.run")
        timers.wrap(engine_module, "sample", "ours.sample")  # what LLMEngine.step calls
        if not cfg.grpo.compile_rollouts:  # a compiled step runs both inside one graph, where no timer can go
            timers.wrap(model, "hidden", "ours.model")
            timers.wrap(model.head, "forward", "ours.head")  # the final norm and the output layer, on sampled rows
        timers.wrap(hf, "forward", "transformers.forward")  # generate calls the instance, which calls forward
    ours_step(0)  # warm-up on the loop's first step, which the loop's numbers leave out
    hf_step(0)
    timers.reset()
    sides = {"ours": ([], 0.0), "transformers": ([], 0.0)}
    load = ForeignLoad()
    for _ in range(args.rounds):
        for step in range(1, args.steps):  # interleaved, so a drifting machine speed hits both alike
            for name, run_step in (("ours", ours_step), ("transformers", hf_step)):
                lengths, seconds = run_step(step)
                sides[name] = (sides[name][0] + lengths, sides[name][1] + seconds)
    outside_load = load.share()

    in_loop = {"tokens": sum(s["tokens"] for s in loop), "seconds": sum(s["generate_s"] for s in loop)}
    in_loop |= {"tokens_per_s": in_loop["tokens"] / in_loop["seconds"],
                "mean_length": in_loop["tokens"] / (per_step * len(loop))}
    alone, theirs = pooled(*sides["ours"]), pooled(*sides["transformers"])
    n = len(loop)
    split = {k: sum(s[k] for s in loop) / n for k in ("generate_s", "rollout_s", "train_s")}
    split["rollout_share"] = split["rollout_s"] / (split["rollout_s"] + split["train_s"])

    g = cfg.grpo
    params = sum(p.numel() for p in model.parameters())
    print()
    print(f"model {args.model.name} ({params / 1e6:.2f}M params, {'bf16' if bf16 else 'fp32'}), {threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{n} measured steps (of {args.steps}, the first left out) x {per_step} completions "
          f"({per_step // g.group_size} prompts x group {g.group_size}), max_new_tokens {g.max_new_tokens}, "
          f"temperature {g.temperature:g}, top_p {g.top_p:g}; outside the loop {args.rounds} round(s)")
    print(f"{'':34}{'tokens/s':>10}{'vs transformers':>17}{'tokens':>8}{'gen s':>8}{'mean len':>10}")
    for name, r in (("ours, in the training loop", in_loop), ("ours, alone (same prompts)", alone),
                    (f"transformers (static batch {hf_batch})", theirs)):
        print(f"{name:34}{r['tokens_per_s']:10.1f}{r['tokens_per_s'] / theirs['tokens_per_s']:16.2f}x"
              f"{r['tokens']:8d}{r['seconds']:8.2f}{r['mean_length']:10.1f}")
    print(f"a training step (mean of the measured): rollout {split['rollout_s']:.2f}s (generation "
          f"{split['generate_s']:.2f}s, the rest {split['rollout_s'] - split['generate_s']:.2f}s: weights copied, "
          f"rewards, log-probs) + train {split['train_s']:.2f}s; rollout {split['rollout_share']:.0%} of the step")
    breakdown = timers.per_forward(sides) if args.breakdown else None
    if breakdown:
        print_breakdown(breakdown, (args.steps - 1) * args.rounds)
    worst = max(x or 0.0 for x in (train_load, outside_load))
    if worst > 0.05:
        print(f"warning: other processes kept up to {worst:.0%} of the cores busy (training run {train_load:.0%}, "
              f"outside the loop {outside_load:.0%}); run again on a quiet machine")
    if args.json:
        result = {"machine": machine, "model": str(args.model), "params": params, "dtype": "bf16" if bf16 else "fp32",
                  "threads": threads, "config": str(args.config), "overrides": args.overrides, "steps": args.steps,
                  "rounds": args.rounds, "completions_per_step": per_step, "group_size": g.group_size,
                  "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                  "hf_batch": hf_batch, "in_loop": in_loop, "ours_alone": alone, "transformers": theirs,
                  "ratio_in_loop": in_loop["tokens_per_s"] / theirs["tokens_per_s"],
                  "ratio_alone": alone["tokens_per_s"] / theirs["tokens_per_s"], "step_split": split,
                  "loop_steps": loop, "breakdown": breakdown,
                  "foreign_load": {"training": train_load, "outside": outside_load}}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
