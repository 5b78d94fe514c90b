#!/usr/bin/env python
"""The 1B preset on this machine: `configs/train/pt_1b.json` (994.9M parameters) for a few steps on 2 ranks
of the real `deepspeed` launcher, ZeRO-3 with the model built under `zero.Init` and activation checkpointing,
against what `astrai-ds plan` predicts for the same launch.

It builds the built-in corpus, a tokenizer and token shards once in --work-dir (the 1B config's own
tokenizer and data are a user's), then trains `--steps` steps of micro-batch 1 and prints, per rank, the
peak resident memory (sampled from /proc every 0.2 s, and the kernel's high-water mark), seconds per step,
tokens/s and MFU from the run's metrics.jsonl, beside plan's model-state and activation bytes per GPU:
plan's counts are DeepSpeed's estimators for bf16 mixed precision (16 bytes per parameter); an fp32 run
keeps 20 (fp32 weights, their fp32 optimizer copy, gradients, two Adam moments).

    .venv/bin/python benchmarks/scale_1b.py --work-dir /tmp/scale                     # ZeRO-3, 3 steps
    .venv/bin/python benchmarks/scale_1b.py --ds-config zero3_offload.json --steps 2 --json out.json
    .venv/bin/python benchmarks/scale_1b.py --ds-config zero3_nvme.json --steps 5 --resume-at 3   # stop, resume
    .venv/bin/python benchmarks/scale_1b.py --lora-r 8 --steps 3                    # LoRA: the base frozen

It needs most of a 24 GiB machine: run it with nothing else running. The run's final checkpoint (about 16
bytes per parameter on disk) is deleted afterwards unless --keep-run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import announce  # noqa: E402  (benchmarks/machine.py)

GIB = 2**30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/train/pt_1b.json", help="train config")
    p.add_argument("--ds-config", default="zero3.json", help="DeepSpeed config")
    p.add_argument("--steps", type=int, default=3, help="training steps (the first one includes warm-up)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    p.add_argument("--precision", default="auto", help="the train config's precision (auto: bf16 where native)")
    p.add_argument("--work-dir", default=None, help="corpus, tokenizer and data, reused on the next run")
    p.add_argument("--resume-at", type=int, default=None,
                   help="stop the run after this step (its final checkpoint), then resume it to --steps with the "
                        "same command: the losses after the restart are those of an uninterrupted run")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train LoRA adapters of this rank on every projection instead of every weight (0: full)")
    p.add_argument("--keep-run", action="store_true", help="keep the run folder and its checkpoint")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args()


def prepare(work: Path, seq_len: int) -> tuple[Path, Path]:
    from astrai_ds.data.corpus import write_corpus
    from astrai_ds.data.prepare import prepare_pretrain
    from astrai_ds.data.tokenizer import train_tokenizer

    tok, data = work / "tokenizer", work / f"pt_{seq_len}"
    if not (work / "corpus" / "pretrain.jsonl").exists():
        write_corpus(work / "corpus", seed=0, scale=0.25)
    if not (tok / "tokenizer.json").exists():
        train_tokenizer([work / "corpus" / "pretrain.jsonl"], 2048, tok)
    if not (data / "index.json").exists():
        prepare_pretrain([work / "corpus" / "pretrain.jsonl"], tok, data, seq_len, workers=1, progress=False)
    return tok, data


class MemorySampler(threading.Thread):
    """Peak resident memory of every `train.py --local_rank=N` process under `root`, sampled every 0.2 s."""

    def __init__(self, root: psutil.Process):
        super().__init__(daemon=True)
        self.root, self.peak, self.hwm, self.done = root, {}, {}, threading.Event()
        self.total_peak = 0

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                break
            for proc in children:
                try:
                    cmd = proc.cmdline()
                    rank = next((int(a.split("=")[1]) for a in cmd if a.startswith("--local_rank=")), None)
                    if rank is None or not any(a.endswith("train.py") for a in cmd):
                        continue
                    rss = proc.memory_info().rss
                    with open(f"/proc/{proc.pid}/status") as f:
                        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
                except (psutil.Error, OSError, StopIteration):
                    continue
                total += rss
                self.peak[rank] = max(self.peak.get(rank, 0), rss)
                self.hwm[rank] = max(self.hwm.get(rank, 0), hwm)
            self.total_peak = max(self.total_peak, total)
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    machine = announce()
    import tempfile

    from astrai_ds.config.deepspeed import load_ds_config
    from astrai_ds.config.model import ModelConfig
    from astrai_ds.config.train import TrainConfig
    from astrai_ds.training.memory import asked_option, plan

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="scale_1b_"))
    work.mkdir(parents=True, exist_ok=True)
    tok, data = prepare(work, args.seq_len)
    cfg = TrainConfig.load(ROOT / args.config)
    from astrai_ds.data.tokenizer import Tokenizer

    model_cfg = ModelConfig.load(ROOT / cfg.model).resolved(Tokenizer.load(tok).vocab_size)
    lora = None
    if args.lora_r:
        from astrai_ds.config.train import LoraConfig
        from astrai_ds.training.memory import lora_counts

        lora = lora_counts(model_cfg, LoraConfig(r=args.lora_r))
    predicted = plan(model_cfg, args.nproc, 1, args.micro_batch, args.seq_len, 24 * GIB, True, lora=lora)
    asked = asked_option(predicted["options"], load_ds_config(args.ds_config)[0])
    if asked is None:
        sys.exit(f"plan has no row for {args.ds_config}: offloading parameters needs the optimizer offloaded too")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    sets = {"tokenizer": tok, "data.path": data, "data.eval_path": "null", "data.seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch, "grad_accum_steps": 1, "max_steps": args.steps,
            "log_interval": 1, "save_interval": 10**9, "output_dir": run, "precision": args.precision,
            "schedule.warmup_steps": 1, "schedule.total_steps": args.steps,
            # glibc's default: freed blocks go back to the OS. Keeping them (faster for small models) lets the
            # heap grow by the gathered layers' and gradients' churn, which a 1B model on 24 GiB cannot spare.
            "cpu.keep_freed_memory": "false", "lora.r": args.lora_r}
    cmd = [str(ROOT / ".venv" / "bin" / "deepspeed"), "--num_gpus", str(args.nproc), "--master_port",
           str(free_port()), "train.py", "--config", args.config, "--ds_config", args.ds_config]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    print(f"plan ({asked['name']}, {args.nproc} ranks, micro {args.micro_batch} x {args.seq_len}, checkpointing): "
          f"{asked['gpu_bytes'] / GIB:.1f} GiB model states + {asked['activations'] / GIB:.2f} GiB activations "
          f"per rank " + ("(LoRA: the frozen base at 2 bytes per parameter)" if lora else "at 16 bytes per parameter"),
          flush=True)
    start = time.time()
    sampler = MemorySampler(psutil.Process())
    sampler.start()
    log = []
    launches = [["--set", f"max_steps={args.resume_at}"], []] if args.resume_at else [[]]
    for extra in launches:  # with --resume-at, the second launch resumes from the first one's last checkpoint
        launcher = subprocess.Popen(cmd + extra, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        for line in launcher.stdout:
            log.append(line)
            if not line.startswith("[20"):
                print(line, end="", flush=True)
        code = launcher.wait()
        if code:
            break
    sampler.done.set()
    sampler.join()
    wall = time.time() - start
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    steps = [m for m in metrics if "train/loss" in m]
    params = predicted["params"]["total"]
    result = {
        "machine": machine,
        "config": args.config, "ds_config": args.ds_config, "lora_r": args.lora_r, "ranks": args.nproc,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len, "resume_at": args.resume_at, "exit_code": code, "wall_s": round(wall, 1),
        "params": params,
        "peak_rss_gib": {r: round(v / GIB, 2) for r, v in sorted(sampler.peak.items())},
        "vm_hwm_gib": {r: round(v / GIB, 2) for r, v in sorted(sampler.hwm.items())},
        "peak_rss_all_ranks_gib": round(sampler.total_peak / GIB, 2),
        "plan_states_gib_per_rank": round(asked["gpu_bytes"] / GIB, 2),
        "plan_activations_gib_per_rank": round(asked["activations"] / GIB, 3),
        "plan_host_gib_per_node": round(asked["host_bytes"] / GIB, 2),
        "plan_nvme_gib_per_node": round(asked["nvme_bytes"] / GIB, 2),
        "fp32_states_gib_per_rank": round(20 * params / args.nproc / GIB, 2),
        "steps": [{"step": m["step"], "loss": m["train/loss"], "tokens_per_sec": m["train/tokens_per_sec"],
                   "mfu": m["train/mfu"]} for m in steps],
    }
    if len(steps) > 1:  # the first step includes the warm-up
        tps = sorted(m["train/tokens_per_sec"] for m in steps[1:])[len(steps[1:]) // 2]
        result["tokens_per_sec"] = round(tps, 1)
        result["seconds_per_step"] = round(args.micro_batch * args.seq_len * args.nproc / tps, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep_run:
        shutil.rmtree(run, ignore_errors=True)
    if code:
        print("".join(log[-20:]), file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
