"""Generate text with a model folder. --prompt streams one completion to stdout as it is generated, then a
one-line summary on stderr. --input FILE.jsonl --output FILE.jsonl runs every request of the file through the
engine together, with a progress bar on stderr: each line is {"prompt": "..."} or {"messages": [...]}, with any
sampling field (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
frequency_penalty, stop, stop_token_ids, seed, logprobs; the options below are the defaults for the fields a
line leaves out) and an optional "id"; every line is checked before the model is loaded. The output holds the
input records in their order, each with completion, finish_reason, prompt_tokens and completion_tokens added; a
request the engine refuses (too long for the context, say) gets finish_reason "error" and an "error" message,
and the others run. Sampling by default (temperature 0.7, top-p 0.9); --temperature 0 is greedy.

With --tp N, run under `deepspeed --num_gpus N --module astrai_ds generate --tp N ...` (or
`torchrun --nproc_per_node N -m astrai_ds generate --tp N ...`): the model's linear layers are split over the N
GPUs, every rank runs the same requests and rank 0 alone prints and writes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from astrai_ds.cli.model_commands import (add_compile_argument, add_model_arguments, add_sampling_arguments,
                                          check_chat, check_sampling, check_tp_launch, load_engine, process_rank,
                                          sampling_defaults, stream_to, summary, user_prompt)
from astrai_ds.data.sources import lone_surrogate
from astrai_ds.errors import UserError

NAME = "generate"
HELP = "generate text with a model folder: one prompt streamed, or a .jsonl file of requests"

# ---------------------------------------------------------------- --input / --output


def read_requests(path: str | Path, defaults: dict, chat: bool, system: str | None) -> list[tuple]:
    """(record, prompt, SamplingParams) of every request of a .jsonl file, all checked; the first wrong line
    raises a UserError naming the file, the line and the field."""
    from dataclasses import fields

    from astrai_ds.inference.sampling import SamplingParams

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    sampling = [f.name for f in fields(SamplingParams)]
    requests = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--input {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg}); every line is one request object") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: a JSON {type(record).__name__}, not an object such as "
                            f'{{"prompt": "...", "max_new_tokens": 64}}')
        bad = lone_surrogate(record)
        if bad is not None:
            raise UserError(f"{where}: '{bad}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which "
                            f"is not text")
        unknown = [k for k in record if k not in ("prompt", "messages", "id", *sampling)]
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a request holds 'prompt' "
                            f"or 'messages', an optional 'id', and sampling fields: {', '.join(sampling)}")
        if ("prompt" in record) == ("messages" in record):
            raise UserError(f"{where}: give either 'prompt' (a string) or 'messages' (a chat), "
                            f"{'not both' if 'prompt' in record else 'found neither'}")
        if "prompt" in record:
            if not isinstance(record["prompt"], str):
                raise UserError(f"{where}: 'prompt' must be a string, got {type(record['prompt']).__name__}; "
                                f"a chat goes in 'messages'")
            prompt = user_prompt(record["prompt"], system) if chat else record["prompt"]
            field = "prompt"
        else:
            prompt, field = record["messages"], "messages"
        if isinstance(prompt, list):
            prompt = check_chat(prompt, f"{where}: '{field}'")
        params = check_sampling({**defaults, **{k: v for k, v in record.items() if k in sampling}}, where)
        requests.append((record, prompt, params))
    if not requests:
        raise UserError(f"--input {path} holds no requests: one JSON object per line, such as "
                        f'{{"prompt": "..."}}')
    return requests


def _output_path(output: str, input_path: str) -> Path:
    out = Path(output)
    if out.resolve() == Path(input_path).resolve() or (out.exists() and os.path.samefile(out, input_path)):
        raise UserError(f"--output {out} is the --input file: give another path (the input stays as it is)")
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {out}: cannot create its folder {out.parent} ({e.strerror})") from None
    return out


def write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    """Write to a temporary file next to `path`, then rename: `path` is never left half written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def output_record(record: dict, completion) -> dict:
    out = dict(record)
    if completion.error is not None:
        out.update(completion=None, finish_reason="error", prompt_tokens=None, completion_tokens=None,
                   error=completion.error)
        return out
    out.update(completion=completion.text, finish_reason=completion.finish_reason,
               prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
    if completion.logprobs is not None:
        out["completion_logprobs"] = completion.logprobs
    return out


# ---------------------------------------------------------------- the command


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="the text to continue; its completion streams to stdout")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt (--prompt, or each 'prompt' of --input) as one user message of a chat, "
                        "rendered with the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message before the user's")
    p.add_argument("--input", default=None, metavar="FILE.jsonl", help="requests to run as a batch, one per line")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="with --input: where the results go")
    add_compile_argument(p)
    add_sampling_arguments(p)
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel GPUs; N > 1 runs under the deepspeed launcher (see above)")


def _check_options(args) -> None:
    if (args.prompt is None) == (args.input is None):
        raise UserError("give either --prompt TEXT (one completion, streamed) or --input FILE.jsonl --output "
                        f"FILE.jsonl (a batch), {'not both' if args.prompt is not None else 'found neither'}")
    if args.output is not None and args.input is None:
        raise UserError("--output is where the results of --input go: give --input FILE.jsonl too")
    if args.input is not None and args.output is None:
        raise UserError("--input needs --output FILE.jsonl: where the results go")
    if args.system is not None and not args.chat:
        raise UserError("--system is the system message of a chat: give --chat too")
    check_tp_launch(args.tp, NAME)


def run(args) -> int:
    _check_options(args)
    defaults = sampling_defaults(args)
    params = check_sampling({**defaults, "seed": args.seed})
    # Everything is checked before the model is loaded: a wrong file fails in a second, not after the load.
    if args.input is not None:
        requests = read_requests(args.input, defaults, args.chat, args.system)
        out_path = _output_path(args.output, args.input)
    else:
        for option, text in (("--prompt", args.prompt), ("--system", args.system)):
            if text is not None and lone_surrogate(text) is not None:  # bytes that are not UTF-8, from the shell
                raise UserError(f"{option} holds bytes that are not UTF-8 text ({text[:40]!a}); is the "
                                f"terminal's encoding UTF-8?")
        prompt = check_chat(user_prompt(args.prompt, args.system), "--prompt") if args.chat else args.prompt
    engine = load_engine(args, args.tp)
    rank0 = process_rank() == 0
    if args.input is not None:
        _run_batch(engine, requests, out_path, rank0)
    else:
        _run_prompt(engine, prompt, params, rank0)
    if args.tp > 1:
        from astrai_ds.inference.ds_inference import close_distributed

        close_distributed()  # every rank got here: tear the process group down before the interpreter exits
    return 0


def _run_batch(engine, requests: list[tuple], out_path: Path, rank0: bool) -> None:
    t0 = time.perf_counter()
    completions = engine.generate_batch([p for _, p, _ in requests], [s for _, _, s in requests], progress=rank0)
    if not rank0:
        return
    write_jsonl_atomically(out_path, [output_record(r, c) for (r, _, _), c in zip(requests, completions)])
    refused = sum(c.error is not None for c in completions)
    tokens = sum(c.completion_tokens for c in completions if c.error is None)
    seconds = time.perf_counter() - t0
    print(f"{len(completions) - refused} completions, {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s) -> {out_path}"
          + (f"; {refused} refused (see their 'error')" if refused else ""), file=sys.stderr)


def _run_prompt(engine, prompt, params, rank0: bool) -> None:
    try:
        result = stream_to(sys.stdout if rank0 else None, engine, prompt, params)
    except KeyboardInterrupt:
        if rank0:
            print(flush=True)  # end the partial line; main() says "interrupted"
        raise
    if rank0:
        print(flush=True)
        print(summary(result), file=sys.stderr)
