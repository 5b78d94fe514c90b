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
import random
import signal
import sys
import time
from pathlib import Path

from astrai_ds.data.sources import lone_surrogate
from astrai_ds.errors import RequestError, UserError

NAME = "generate"
HELP = "generate text with a model folder: one prompt streamed, or a .jsonl file of requests"

# SamplingParams field -> the option that sets its default; what a bad value's message names.
SAMPLING_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                    "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
                    "stop": "--stop", "seed": "--seed"}


# ---------------------------------------------------------------- options shared with `chat`


def add_model_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (from `astrai-ds export`)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights and activations; auto: bf16 where the device runs it natively")


def model_dtype(name: str):
    """The torch dtype of --dtype: bf16, fp32, or auto (bf16 where the device runs it natively)."""
    import torch

    from astrai_ds.training.distributed import bf16_supported

    bf16 = name == "bf16" or (name == "auto" and bf16_supported())
    return torch.bfloat16 if bf16 else torch.float32


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="tokens to generate at most per answer")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="0 is greedy (the most likely token each time)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the k most likely tokens only; 0 is off")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="sample from the smallest set of most likely tokens whose mass reaches p, in (0, 1]")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than min-p times the most likely one, in [0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="> 1 makes tokens of the prompt and the answer so far less likely; 1 is off")
    p.add_argument("--stop", action="extend", nargs="+", default=None, metavar="TEXT",
                   help="stop before this text (repeat the option or give several; a newline: --stop $'\\n')")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the sampling: the same seed and options give the same text "
                        "(default: a new one each run)")


def sampling_defaults(args) -> dict:
    """The SamplingParams fields the options set (without the seed: see `engine_seed`)."""
    fields = {field: getattr(args, field) for field in SAMPLING_OPTIONS if field != "seed"}
    return {**fields, "stop": fields["stop"] or []}


def check_sampling(fields: dict, where: str = ""):
    """SamplingParams(**fields); a bad value is a UserError naming the option (where="") or `where` and the field."""
    from astrai_ds.inference.sampling import SamplingParams

    try:
        return SamplingParams(**fields)
    except RequestError as e:
        field = str(e).split(" ", 1)[0]
        if where:
            raise RequestError(f"{where}: {e}") from None
        option = SAMPLING_OPTIONS.get(field)
        raise RequestError(f"{option} {fields[field]!r}: {e}" if option else str(e)) from None


def engine_seed(seed: int | None, tp: int) -> int:
    """The engine's seed (it seeds every request that brings none): --seed, or a random one, which with tensor
    parallelism rank 0 chooses and sends to the others, as every rank must draw the same tokens."""
    if seed is not None:
        return seed
    seed = random.randrange(2**63)
    if tp > 1:  # tensor_parallel has started the process group
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def load_engine(args, tp: int = 1, **engine_options):
    """The engine over the model folder, on the GPU when there is one; with tp > 1, the model sharded over the
    launcher's ranks. Its EngineConfig: the seed from --seed, and `engine_options`."""
    import torch

    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.model.io import load_model_folder

    dtype = model_dtype(args.dtype)
    if tp > 1:
        # Every rank loads the whole model on the CPU; tensor_parallel starts the process group and keeps this
        # rank's shard on its device.
        from astrai_ds.inference.ds_inference import tensor_parallel

        model, tokenizer = load_model_folder(args.model, dtype=dtype)
        model = tensor_parallel(model, tp, dtype)
    else:
        model, tokenizer = load_model_folder(args.model, dtype=dtype,
                                             device="cuda" if torch.cuda.is_available() else "cpu")
    return LLMEngine(model, tokenizer, EngineConfig(seed=engine_seed(args.seed, tp), **engine_options))


def user_prompt(text: str, system: str | None) -> list[dict]:
    """`text` as one user message, after a system message when `system` is given."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


class StopOnCtrlC:
    """While active, Ctrl-C sets `stopped` instead of raising KeyboardInterrupt, so that the loop over an engine
    stops between two steps, never inside one (where the cache and the scheduler would be half updated)."""

    def __init__(self):
        self.stopped = False

    def _handler(self, signum, frame):
        self.stopped = True

    def __enter__(self):
        self.stopped = False
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def stream_to(out, engine, prompt, params, stop: StopOnCtrlC | None = None) -> dict:
    """Stream one completion to `out` (None: nowhere), flushing every delta; return its text and numbers.
    A set `stop.stopped` ends (aborts) the request after the current step."""
    t0 = time.perf_counter()
    first = None
    text, last = [], None
    outputs = engine.stream(prompt, params)
    try:
        for last in outputs:
            first = first if first is not None else time.perf_counter()
            text.append(last.text)
            if out is not None and last.text:
                out.write(last.text)
                out.flush()
            if stop is not None and stop.stopped:
                break
    finally:
        outputs.close()  # aborts the request if it did not finish
    seconds = time.perf_counter() - t0
    done = last is not None and last.finished
    if done and last.finish_reason == "error":  # this request failed alone (the engine goes on): say why
        raise UserError(f"the generation failed: {last.error}")
    return {"text": "".join(text), "finish_reason": last.finish_reason if done else "interrupted",
            "prompt_tokens": last.prompt_tokens if last else 0,
            "completion_tokens": last.completion_tokens if last else 0,
            "seconds": seconds, "first_token_s": None if first is None else first - t0}


def summary(result: dict) -> str:
    n, seconds, ttft = result["completion_tokens"], result["seconds"], result["first_token_s"]
    rate = f"{n / seconds:.1f} tokens/s" if seconds > 0 else "- tokens/s"
    first = f"first token after {ttft * 1000:.0f} ms" if ttft is not None else "no token"
    return (f"{n} tokens ({result['prompt_tokens']} in the prompt), finish: {result['finish_reason']}, {rate}, "
            f"{first}")


def check_chat(messages: list[dict], where: str) -> list[dict]:
    """The checked messages of a generation prompt (see data.chat.check_messages); a UserError naming `where`."""
    from astrai_ds.data.chat import check_messages

    try:
        return check_messages(messages, final=None)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


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


def check_tp_launch(tp: int, command: str) -> None:
    """Before the model loads, what the environment already tells about --tp (tensor_parallel checks the rest):
    a single process, or a launcher's world of another size."""
    from astrai_ds.launch_env import world_size

    if tp < 1:
        raise UserError(f"--tp must be at least 1, got {tp}")
    world = world_size()
    if tp > 1 and (world or 1) != tp:
        from astrai_ds.inference.ds_inference import launch_hint

        raise UserError(f"--tp {tp} needs {tp} processes, one per GPU, and this is "
                        f"{'a single one' if world is None else f'one of {world}'}; {launch_hint(tp, command)}")


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


def process_rank() -> int:
    """This process's rank: rank 0 alone prints and writes."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


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
