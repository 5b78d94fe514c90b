"""What the commands that run a model share (generate, chat, serve, rag, eval): the model and sampling options
and their checks, loading the engine (on a GPU, or sharded over tensor-parallel ranks), and streaming one answer to
a terminal with Ctrl-C stopping it between two steps."""

from __future__ import annotations

import os
import random
import signal
import time

from astrai_ds.errors import RequestError, UserError

# SamplingParams field -> the option that sets its default; what a bad value's message names.
SAMPLING_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                    "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
                    "stop": "--stop", "seed": "--seed"}


def add_model_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (from `astrai-ds export`)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights and activations; auto: bf16 where the device runs it natively")


def add_compile_argument(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through compiled graphs (torch.compile, inductor), one for a single sequence and one "
                        "for batches: each compiles on its first use (tens of seconds on a CPU; serve compiles both "
                        "before it starts), then decoding runs faster (docs/benchmarks.md)")


def compile_decode(args, tp: int = 1) -> bool:
    """Whether the engine compiles its decode steps: --compile, unless tensor-parallel ranks or a CPU without a C++
    compiler rule it out (then one line on stderr, and eager decoding)."""
    import sys

    import torch

    from astrai_ds.extensions import no_cpp_compiler, use_compile_cache

    if not getattr(args, "compile", False):
        return False
    if tp > 1:
        print("compile: not with --tp (the sharded layers all-reduce inside the step); decoding eager", file=sys.stderr)
        return False
    if not torch.cuda.is_available() and (line := no_cpp_compiler("decoding eager", "leave out --compile")):
        print(line, file=sys.stderr)
        return False
    cache = use_compile_cache()
    print(f"compile: the decode steps compile on their first use; kernels are cached in {cache}",
          file=sys.stderr, flush=True)
    return True


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
    launcher's ranks. Its EngineConfig: the seed from --seed, compiled decoding from --compile, and `engine_options`."""
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
    return LLMEngine(model, tokenizer, EngineConfig(seed=engine_seed(args.seed, tp), compile=compile_decode(args, tp),
                                                    **engine_options))


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


def process_rank() -> int:
    """This process's rank: rank 0 alone prints and writes."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
