#!/usr/bin/env python
"""Training throughput: a plain PyTorch loop against our trainer with ZeRO-2 on 1 and on 2 ranks.

All three variants train the same model from the same initial weights on the same global batches (the
built-in corpus, our tokenizer and token shards, made once in the work folder), with the same AdamW
hyper-parameters, loss and gradient clipping:

  plain          one process, all threads: Transformer cast to bf16 (no fp32 master copy; --precision fp32
                 keeps every variant in fp32, for CPUs without native bf16), torch's AdamW
                 with its defaults and the trainer's parameter groups, `token_cross_entropy`, clipping 1.0,
                 and the trainer's malloc setting (cpu.keep_freed_memory; --default-malloc turns it off in
                 every variant).
  plain-2proc    two such loops at once, one thread each, each on its half of every global batch, with no
                 communication at all: the most that any 2-rank data-parallel run reaches on this machine
                 (its tokens/s is the sum of the two loops').
  trainer-1rank  `python train.py --ds_config zero2.json` (one rank, all threads).
  trainer-2rank  `deepspeed --num_gpus 2 train.py --ds_config zero2.json` (the real launcher; each rank
                 gets cores / 2 threads and half of every global batch).

Tokens/s is the median over the measured steps after the warm-up steps: the plain loop times each step
with time.perf_counter; the trainer runs log every step and their per-step `train/tokens_per_sec` is read
back from metrics.jsonl (a final checkpoint is written after the last step, outside the timings). MFU is
taken against a matmul peak in the training dtype measured in this run (2048^3, all threads, before and after the
variants; the higher of the two):

    MFU = tokens/s * flops_per_token / peak
    flops_per_token = 6 N + 12 L d T   (PaLM, Chowdhery et al. 2022, appendix B)

N counts the weights of every matmul (the blocks' projections and the output head, not the embedding
lookup or the norms), L the layers, d the model width, T the sequence length.

`--breakdown` adds instrumented runs of the trainer (benchmarks/train_breakdown.py: the same train.py code
path, started through the same launcher) that time each step's data, model forward, engine.backward,
engine.step and the collectives inside them, next to the same phases of the plain loop: where the time of
DeepSpeed goes. The machine's description (benchmarks/machine.py) heads the printout and the JSON.

    .venv/bin/python benchmarks/train_throughput.py                          # small model, the full run
    .venv/bin/python benchmarks/train_throughput.py --breakdown --json out.json
    .venv/bin/python benchmarks/train_throughput.py --model configs/model/tiny.json --steps 4 --warmup 1

Run it on a quiet machine: every variant uses every core, and anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import ForeignLoad, announce  # noqa: E402  (benchmarks/machine.py)
from train_breakdown import SCRIPT as BREAKDOWN_SCRIPT, WORKER_ENV, print_breakdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START_DIR = Path.cwd()  # where the script was started: its relative paths are taken from here
VENV_BIN = Path(sys.executable).parent
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("plain", "plain-2proc", "trainer-1rank", "trainer-2rank")
RANKS = {"plain": 1, "plain-2proc": 2, "trainer-1rank": 1, "trainer-2rank": 2}
FORMULA = "6 N + 12 L d T (PaLM appendix B; N = matmul weights incl. the output head, not the embedding)"
PLAIN_WORKER_ENV = "ASTRAI_BENCH_PLAIN_WORKER"  # JSON {rank, work, out}: this process is one of plain-2proc's loops


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="configs/model/small.json", help="model config")
    p.add_argument("--train-config", default="configs/train/pt_small.json",
                   help="train config the runs start from (optimizer settings and seed come from it; data, batch, "
                        "steps, logging and schedule are overridden)")
    p.add_argument("--ds-config", action="append", dest="ds_configs", default=None, metavar="DS_CONFIG",
                   help="DeepSpeed config of the trainer runs; repeat it to compare several in one run (each gets "
                        "its own 1-rank and 2-rank variants) [default: zero2.json]"),
    p.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="steps run before the measured ones and not counted")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per optimizer step for every variant (2 ranks take half each; the default is "
                        "pt_small's micro batch of 8 on 2 ranks)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variants this many times, interleaved, and pool the measured steps (evens out "
                        "drift on a noisy machine)")
    p.add_argument("--skip", action="append", default=[], choices=VARIANTS, help="leave out a variant (repeatable)")
    p.add_argument("--compile", action="store_true",
                   help="also run each trainer variant with compile=true (torch.compile; named +compile)")
    p.add_argument("--unfused", action="store_true",
                   help="also run each trainer variant with fused_loss=false (the whole logits; named +unfused)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is in every variant (by default the plain loop keeps freed memory "
                        "like the trainer does, cpu.keep_freed_memory, so both run on the same allocator)")
    p.add_argument("--breakdown", action="store_true",
                   help="also run the trainer variants instrumented and print where each step's time goes")
    p.add_argument("--work-dir", default=None,
                   help="folder for the corpus, tokenizer, shards and runs; reused when given (kept afterwards), "
                        "a temporary one otherwise (removed afterwards)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (the quickstart's)")
    p.add_argument("--corpus-scale", type=float, default=1.0, help="built-in corpus scale")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak measurement")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="what every variant trains in (and the peak's dtype); fp32 on a CPU without native bf16, "
                        "where bf16 matmuls are emulated and measure the emulation")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed for one trainer run")
    p.add_argument("--keep-runs", action="store_true", help="keep the trainer runs' folders (logs, checkpoints)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be positive, --warmup non-negative")
    if args.global_batch < 2 or args.global_batch % 2:
        p.error("--global-batch must be even (the 2-rank run splits it)")
    # Paths are taken relative to where the script was started; configs not found there fall back to the project.
    args.ds_configs = args.ds_configs or ["zero2.json"]
    for key in ("model", "train_config"):
        if Path(getattr(args, key)).exists():
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    args.ds_configs = [str(Path(c).resolve()) if Path(c).exists() else c for c in args.ds_configs]
    for key in ("work_dir", "json_out"):
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    return args


# ---------------------------------------------------------------------------------------------- set-up

def build_data(work: Path, args) -> None:
    """Corpus, tokenizer and pretraining shards under `work`, reused when a previous run made the same."""
    from astrai_ds.data.corpus import write_corpus
    from astrai_ds.data.prepare import prepare_pretrain
    from astrai_ds.data.tokenizer import train_tokenizer

    stamp = work / "data.json"
    want = {"vocab_size": args.vocab_size, "corpus_scale": args.corpus_scale, "corpus_seed": 0}
    if (stamp.exists() and json.loads(stamp.read_text()) == want
            and (work / "data" / "pt" / "index.json").exists() and (work / "tokenizer" / "tokenizer.json").exists()):
        print(f"data: reusing {work}", flush=True)
        return
    t0 = time.perf_counter()
    write_corpus(work / "corpus", seed=0, scale=args.corpus_scale)
    train_tokenizer([work / "corpus" / "pretrain.jsonl"], args.vocab_size, work / "tokenizer")
    prepare_pretrain([work / "corpus" / "pretrain.jsonl"], work / "tokenizer", work / "data" / "pt", args.seq_len,
                     progress=False, overwrite=True)
    stamp.write_text(json.dumps(want) + "\n")
    print(f"data: corpus, tokenizer and shards built in {time.perf_counter() - t0:.0f}s under {work}", flush=True)


def overrides(work: Path, args, run_dir: Path, ranks: int) -> list[str]:
    """The `--set` overrides of the trainer runs; the plain loop reads its settings from the same config."""
    return [
        f"model={args.model}",
        f"tokenizer={work / 'tokenizer'}",
        f"data.path={work / 'data' / 'pt'}",
        "data.eval_path=null",  # no evaluation
        f"data.seq_len={args.seq_len}",
        f"output_dir={run_dir}",
        f"max_steps={args.warmup + args.steps}",
        f"micro_batch_size={args.global_batch // ranks}",
        "grad_accum_steps=1",
        "log_interval=1",  # a metrics.jsonl line (with tokens/s) per step
        "save_interval=1000000000",  # no checkpoint inside the measured steps (the final one comes after)
        "eval_interval=1000000000",
        "resume=none",
        f"precision={args.precision}",
        "activation_checkpointing=false",
        "schedule.type=constant",  # the plain loop's constant lr, so the loss curves can be compared
        "schedule.warmup_steps=0",
        f"cpu.keep_freed_memory={'false' if args.default_malloc else 'true'}",
    ]


def load_configs(work: Path, args):
    from astrai_ds.config.base import find_file
    from astrai_ds.config.model import ModelConfig
    from astrai_ds.config.train import TrainConfig
    from astrai_ds.data.tokenizer import Tokenizer

    cfg = TrainConfig.load(find_file(args.train_config, "train config"), overrides(work, args, work / "unused", 1))
    vocab = Tokenizer.load(cfg.tokenizer).vocab_size
    model_cfg = ModelConfig.load(find_file(cfg.model, "model config")).resolved(vocab)
    if args.seq_len > model_cfg.max_seq_len:
        sys.exit(f"--seq-len {args.seq_len} is above the model's max_seq_len {model_cfg.max_seq_len}")
    return cfg, model_cfg


def peak_flops(size: int, precision: str = "bf16") -> float:
    from astrai_ds.training.metrics import measure_peak_flops

    return measure_peak_flops(torch.device("cpu"), DTYPES[precision], size=size)


# ------------------------------------------------------------------------------------------ the variants

def run_plain(cfg, model_cfg, args, rank: int = 0, world: int = 1) -> dict:
    """The baseline: bf16 (or --precision fp32) weights, torch AdamW, the trainer's loss and clipping, the same
    batches (with `world` > 1: rank `rank`'s share of them, as a trainer rank would draw it)."""
    from astrai_ds.data.datasets import PretrainDataset, collate_pretrain
    from astrai_ds.data.sampler import DistributedBatchSampler
    from astrai_ds.data.shards import TokenShards
    from astrai_ds.model import Transformer
    from astrai_ds.training.batches import BatchIterator
    from astrai_ds.training.engine import param_groups
    from astrai_ds.model.losses import token_cross_entropy

    if not args.default_malloc:
        from astrai_ds.training.cpu import keep_freed_memory

        keep_freed_memory()  # the trainer's allocator setting (cpu.keep_freed_memory), for a like-for-like loop
    dataset = PretrainDataset(TokenShards(cfg.data.path), cfg.data.seq_len)
    # World 1 with micro = the global batch: rank r of a trainer world draws the r-th slice of the same batch.
    micro = args.global_batch // world
    sampler = DistributedBatchSampler(len(dataset), micro, rank, world, cfg.seed, shuffle=cfg.data.shuffle)
    batches = BatchIterator(dataset, sampler, collate_pretrain, torch.device("cpu"))
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    model = Transformer(model_cfg).to(DTYPES[args.precision]).train()
    o = cfg.optimizer  # torch's own defaults otherwise (on CPU: the per-tensor loop, not fused)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    tokens = micro * args.seq_len
    steps, losses = [], []
    for _ in range(args.warmup + args.steps):
        t = [time.perf_counter()]
        batch = batches.next()
        t.append(time.perf_counter())
        logits = model(batch["input_ids"])
        t.append(time.perf_counter())
        loss = token_cross_entropy(logits, batch["labels"])
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        losses.append(loss.item())
        del logits, loss
        t.append(time.perf_counter())
        # t: start, data, forward, loss, backward, clip + optimizer, loss read
        steps.append({"wall": t[6] - t[0], "data": t[1] - t[0], "forward": t[2] - t[1], "backward": t[4] - t[3],
                      "step": t[5] - t[4], "other": (t[3] - t[2]) + (t[6] - t[5]), "comm": 0.0})
    del model, opt
    measured = steps[args.warmup:]
    return {"tokens_per_sec": [tokens / s["wall"] for s in measured], "losses": losses,
            "threads_per_rank": torch.get_num_threads(), "phases": measured}


def run_plain_2proc(work: Path, args) -> dict:
    """Two plain loops at once (this script in plain-worker mode), one thread each; per step, the sum of their
    tokens/s."""
    procs, outs = [], []
    for rank in range(2):
        out = work / "runs" / f"plain-2proc-{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        spec = json.dumps({"rank": rank, "work": str(work), "out": str(out)})
        env = child_env({PLAIN_WORKER_ENV: spec, "OMP_NUM_THREADS": "1"})
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], cwd=START_DIR,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    for proc in procs:
        log, _ = proc.communicate(timeout=args.timeout)
        if proc.returncode != 0:
            sys.exit(f"plain-2proc loop exited {proc.returncode}:\n{log[-4000:]}")
    loops = [json.loads(o.read_text()) for o in outs]
    return {"tokens_per_sec": [a + b for a, b in zip(*(loop["tokens_per_sec"] for loop in loops))],
            "losses": loops[0]["losses"], "threads_per_rank": 1}


def plain_worker_main(spec: str) -> int:
    """One loop of plain-2proc: the plain loop on its rank's half of the batches, one thread."""
    spec = json.loads(spec)
    args = parse_args()  # in the folder the benchmark was started from, like the parent's arguments
    os.chdir(ROOT)
    torch.set_num_threads(1)
    cfg, model_cfg = load_configs(Path(spec["work"]), args)
    res = run_plain(cfg, model_cfg, args, rank=spec["rank"], world=2)
    Path(spec["out"]).write_text(json.dumps({"tokens_per_sec": res["tokens_per_sec"], "losses": res["losses"]}))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def list_variants(args) -> dict[str, tuple[int, str | None, tuple[str, ...]]]:
    """Variant name -> (ranks, DeepSpeed config, extra train config overrides). With one DeepSpeed config the
    trainer variants are called trainer-1rank and trainer-2rank; with several, the config's file stem is added in
    brackets. --compile adds each trainer variant again with `compile=true` (name +compile), --unfused with
    `fused_loss=false` (name +unfused: the loss from the whole logits, as before the chunked head loss)."""
    variants: dict[str, tuple[int, str | None, tuple[str, ...]]] = {}
    for plain in ("plain", "plain-2proc"):
        if plain not in args.skip:
            variants[plain] = (RANKS[plain], None, ())
    extras = {"": ()}
    if args.compile:
        extras["+compile"] = ("compile=true",)
    if args.unfused:
        extras["+unfused"] = ("fused_loss=false",)
    for ds_config in args.ds_configs:
        for kind in ("trainer-1rank", "trainer-2rank"):
            if kind not in args.skip:
                name = kind if len(args.ds_configs) == 1 else f"{kind}[{Path(ds_config).stem}]"
                for suffix, sets in extras.items():
                    variants[name + suffix] = (RANKS[kind], ds_config, sets)
    return variants


def tag(variant: str) -> str:
    """A variant's name as a file name."""
    return variant.replace("[", "-").replace("]", "")


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    from astrai_ds.extensions import use_extensions_cache

    env["TORCH_EXTENSIONS_DIR"] = str(use_extensions_cache())
    env["PYTHONUNBUFFERED"] = "1"
    # train.py splits the cores between the ranks of a machine unless OMP_NUM_THREADS says otherwise.
    env.pop("OMP_NUM_THREADS", None)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE",
                WORKER_ENV, PLAIN_WORKER_ENV):
        env.pop(var, None)  # a world of its own, whatever started this script
    env.update(extra or {})
    return env


def run_train(config, ds_config: str, sets: list[str], log: Path, timeout: int, extra_env: dict | None = None) -> None:
    """`python train.py --config CONFIG --ds_config DS_CONFIG --set ...` on one rank in the trainer's environment,
    its output to `log`; exits with the log's tail when the run fails (grpo.py and muon.py train this way)."""
    cmd = [sys.executable, "train.py", "--config", str(config), "--ds_config", ds_config]
    for s in sets:
        cmd += ["--set", s]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(extra_env), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{' '.join(cmd)}\nexited {proc.returncode}; the end of {log}:\n{tail}")


def launch(work: Path, args, ranks: int, ds_config: str, tag: str, script: str, extra_env: dict | None = None,
           sets: tuple[str, ...] = ()) -> Path:
    """Run `script` with train.py's arguments on `ranks` ranks (plain python for 1, the deepspeed launcher for
    more); returns the run folder. Exits with the log's tail when the run fails."""
    run_dir = work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to; start clean
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = None
    if ranks == 1:
        cmd = [sys.executable, script]
    else:
        port = free_port()
        launcher = VENV_BIN / "deepspeed"
        cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(port), script]
    cmd += ["--config", args.train_config, "--ds_config", ds_config]
    for s in [*overrides(work, args, run_dir, ranks), *sets]:
        cmd += ["--set", s]
    log = work / "runs" / f"{tag}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(extra_env), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
    finally:
        if port is not None:  # DeepSpeed's CPU all-reduce never unlinks its shared-memory buffers
            for buf in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                buf.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{' '.join(cmd)}\nexited {proc.returncode}; the end of {log}:\n{tail}")
    return run_dir


def run_trainer(work: Path, args, ranks: int, ds_config: str, sets: tuple[str, ...], tag: str) -> dict:
    """train.py on `ranks` ranks; per-step tokens/s read back from the run's metrics.jsonl."""
    run_dir = launch(work, args, ranks, ds_config, tag, "train.py", sets=sets)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "train/tokens_per_sec" in r}
    measured = range(args.warmup + 1, args.warmup + args.steps + 1)
    missing = [s for s in measured if s not in by_step]
    if missing:
        sys.exit(f"{run_dir / 'metrics.jsonl'} has no train/tokens_per_sec for steps {missing}")
    result = {"tokens_per_sec": [by_step[s]["train/tokens_per_sec"] for s in measured],
              "losses": [by_step[s]["train/loss"] for s in sorted(by_step)],
              "threads_per_rank": torch.get_num_threads() if ranks == 1 else max(1, (os.cpu_count() or 1) // ranks)}
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)  # the final checkpoint is large
    return result


def run_breakdown(work: Path, args, ranks: int, ds_config: str, sets: tuple[str, ...], tag: str) -> list[dict]:
    """benchmarks/train_breakdown.py, an instrumented train.py, on `ranks` ranks; rank 0's per-step phases."""
    out = work / "runs" / f"{tag}.phases.json"
    out.unlink(missing_ok=True)
    run_dir = launch(work, args, ranks, ds_config, tag, str(BREAKDOWN_SCRIPT), {WORKER_ENV: str(out)}, sets=sets)
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return json.loads(out.read_text())[args.warmup:]


# ------------------------------------------------------------------------------------------------ report

def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def summarise(name: str, ranks: int, runs: list[dict], tokens_per_step: int, flops_per_token: float,
              peak: float) -> dict:
    tps = [x for r in runs for x in r["tokens_per_sec"]]
    loads = [r["foreign_load"] for r in runs if r.get("foreign_load") is not None]
    med = statistics.median(tps)
    q = statistics.quantiles(tps, n=4) if len(tps) > 1 else [med, med, med]
    return {"variant": name, "ranks": ranks, "threads_per_rank": runs[0]["threads_per_rank"],
            "tokens_per_sec": med, "tokens_per_sec_p25": q[0], "tokens_per_sec_p75": q[2],
            "step_time_s": tokens_per_step / med, "measured_steps": len(tps),
            "mfu": med * flops_per_token / peak, "first_loss": runs[0]["losses"][0],
            "last_loss": runs[0]["losses"][-1], "foreign_load": max(loads) if loads else None,
            "tokens_per_sec_all": tps}


def print_table(rows: list[dict]) -> None:
    base = next((r["tokens_per_sec"] for r in rows if r["variant"] == "plain"), None)
    w = max(15, *(len(r["variant"]) for r in rows))
    head = (f"{'variant':<{w}} {'ranks x thr':>11} {'tokens/s':>9} {'p25-p75':>13} {'step s':>7} {'vs plain':>8} "
            f"{'MFU':>6} {'loss 1st/last':>15} {'other load':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        r["vs_plain"] = r["tokens_per_sec"] / base if base else None
        ratio = f"{r['vs_plain']:.2f}x" if base else "-"
        print(f"{r['variant']:<{w}} {r['ranks']:>5} x {r['threads_per_rank']:<3} {r['tokens_per_sec']:>9.0f} "
              f"{r['tokens_per_sec_p25']:>6.0f}-{r['tokens_per_sec_p75']:<6.0f} {r['step_time_s']:>7.3f} "
              f"{ratio:>8} {r['mfu']:>6.3f} {r['first_loss']:>7.3f}/{r['last_loss']:<7.3f} "
              f"{_pct(r['foreign_load']):>10}")
    worst = max((r["foreign_load"] or 0.0) for r in rows)
    if worst > 0.05:
        print(f"warning: other processes kept up to {worst:.0%} of the cores busy during a variant (column 'other "
              "load'); those numbers are skewed, run again on a quiet machine")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # configs and train.py are found relative to the project
    variants = list_variants(args)
    info = announce()
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} applies to the plain loop only; the trainer "
              "runs get it unset so train.py splits the cores between ranks", flush=True)

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tmp := tempfile.mkdtemp(prefix="astrai_bench_"))
    try:
        build_data(work, args)
        cfg, model_cfg = load_configs(work, args)
        from astrai_ds.model import Transformer

        with torch.device("meta"):  # the shapes are all flops_per_token needs
            flops_per_token = Transformer(model_cfg).flops_per_token(args.seq_len)
        tokens_per_step = args.global_batch * args.seq_len
        print(f"model: {args.model} (dim {model_cfg.dim}, {model_cfg.n_layers} layers, vocab {model_cfg.vocab_size}) | "
              f"global batch {args.global_batch} x {args.seq_len} tokens = {tokens_per_step} tokens/step | "
              f"{', '.join(args.ds_configs)} | {args.warmup} warm-up + {args.steps} measured steps x "
              f"{args.rounds} round(s) | "
              f"{flops_per_token / 1e6:.1f} MFLOP/token", flush=True)

        peaks = [peak_flops(args.peak_size, args.precision)]
        print(f"peak: {peaks[0] / 1e9:.0f} GFLOP/s ({args.precision} {args.peak_size}^3 matmul, "
              f"{torch.get_num_threads()} threads)", flush=True)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        breakdown: dict[str, list[dict]] = {v: [] for v in variants}
        for rnd in range(args.rounds):
            for v in variants:
                t0, load = time.perf_counter(), ForeignLoad()
                if v == "plain":
                    res = run_plain(cfg, model_cfg, args)
                    breakdown[v] += res["phases"]
                elif v == "plain-2proc":
                    res = run_plain_2proc(work, args)
                else:
                    res = run_trainer(work, args, *variants[v], f"{tag(v)}-r{rnd}")
                res["foreign_load"] = load.share()
                results[v].append(res)
                print(f"round {rnd + 1}/{args.rounds} {v}: median {statistics.median(res['tokens_per_sec']):.0f} "
                      f"tokens/s ({time.perf_counter() - t0:.0f}s wall, other processes' CPU load "
                      f"{_pct(res['foreign_load'])})", flush=True)
                if args.breakdown and v.startswith("trainer"):
                    t0, load = time.perf_counter(), ForeignLoad()
                    breakdown[v] += run_breakdown(work, args, *variants[v], f"{tag(v)}-breakdown-r{rnd}")
                    print(f"round {rnd + 1}/{args.rounds} {v}: instrumented run ({time.perf_counter() - t0:.0f}s wall, "
                          f"other processes' CPU load {_pct(load.share())})", flush=True)
        peaks.append(peak_flops(args.peak_size, args.precision))
        peak = max(peaks)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [summarise(v, variants[v][0], results[v], tokens_per_step, flops_per_token, peak) for v in variants]
    print()
    print(f"FLOPs/token = {FORMULA} = {flops_per_token / 1e6:.2f} MFLOP at T={args.seq_len}")
    print(f"peak = {peak / 1e9:.0f} GFLOP/s: the higher of two {args.precision} {args.peak_size}^3 matmul "
          f"measurements in this run (before: {peaks[0] / 1e9:.0f}, after: {peaks[1] / 1e9:.0f}), "
          f"{torch.get_num_threads()} threads")
    print("tokens/s = median over the measured steps of all rounds; MFU = tokens/s x FLOPs/token / peak")
    print()
    print_table(rows)
    phases = None
    if args.breakdown:
        print()
        phases = print_breakdown({v: s for v, s in breakdown.items() if s})
    if args.json_out:
        out = {"machine": info, "model": args.model, "model_config": model_cfg.to_dict(), "seq_len": args.seq_len,
               "global_batch": args.global_batch, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
               "ds_configs": args.ds_configs, "flops_per_token": flops_per_token, "flops_formula": FORMULA,
               "peak_flops": peak, "peak_flops_measurements": peaks, "results": rows,
               "phases_median_s": phases}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    if os.environ.get(PLAIN_WORKER_ENV):
        sys.exit(plain_worker_main(os.environ[PLAIN_WORKER_ENV]))
    sys.exit(main())
