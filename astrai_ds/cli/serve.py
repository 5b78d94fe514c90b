"""Serve a model folder over HTTP: the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions,
/v1/embeddings), the Anthropic Messages API (/v1/messages, /v1/messages/count_tokens), /health, /metrics
(Prometheus) and a chat page at /. Every client's requests share one generation engine (continuous batching,
paged KV cache with prefix reuse).

Binds 127.0.0.1 unless --host says otherwise, and answers only to the Host names of its address (and
--allowed-host). With an API key (--api-key, or the ASTRAI_API_KEY environment variable), every /v1 route and
/metrics need `Authorization: Bearer KEY` (or `x-api-key: KEY`). Beyond --max-waiting queued requests, a new one
gets 429 with Retry-After. Browsers' cross-origin calls are refused unless --allow-origin names the page's origin.
SIGTERM drains: new requests
get 503, the running ones finish (at most --drain-timeout seconds), then the server exits 0; Ctrl-C stops at once.
A request that fails alone (while it is prepared or sampled) gets a 500 and the engine goes on; if the model step
itself fails, the server stops and exits 1, for a supervisor to start it again.

With --tp N, run under `deepspeed --num_gpus N --module astrai_ds serve --tp N ...`: rank 0 serves HTTP and
all ranks step the engine together."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from astrai_ds.errors import UserError

NAME = "serve"
HELP = "serve a model folder over HTTP (OpenAI and Anthropic APIs, metrics, a chat page)"

def parse_kv_budget(text: str) -> dict:
    """--kv-budget: a number of tokens ("65536") or a memory size ("2GiB", "512MiB", read as `plan` reads sizes);
    EngineConfig fields."""
    from astrai_ds.cli.plan import memory_size

    if text.strip().isdigit():
        return {"kv_cache_tokens": int(text)}
    examples = "a number of tokens (65536) or a memory size (2GiB, 512MiB)"
    return {"kv_cache_memory": memory_size(text, "--kv-budget", examples)}


def add_arguments(p) -> None:
    from astrai_ds.cli.model_commands import add_compile_argument, add_model_arguments

    add_model_arguments(p)
    add_compile_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key on every /v1 route (default: $ASTRAI_API_KEY, else no key)")
    p.add_argument("--open-metrics", action="store_true",
                   help="serve /metrics without the API key (for a Prometheus scraper; by default --api-key guards it)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to accept besides the loopback names and --host (repeat for more; '*' for "
                        "any). A server bound to 0.0.0.0 accepts any name unless this is given")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example.com) whose pages may call the API from a browser (CORS; "
                        "repeat for more; '*' for any). Default: none")
    p.add_argument("--served-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model folder's name)")
    p.add_argument("--max-running", type=int, default=64, metavar="N", help="requests stepped together at most")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests waiting for their first step at most; beyond it a request gets 429 (529 on "
                        "/v1/messages) with Retry-After")
    p.add_argument("--kv-budget", default="1GiB", metavar="SIZE",
                   help="KV cache pool: tokens (65536) or memory (2GiB)")
    p.add_argument("--max-batched-tokens", type=int, default=512, metavar="N",
                   help="new tokens per engine step (prefill chunks and decode tokens)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="after SIGTERM, how long running requests may take to finish")
    p.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB", help="largest request body accepted")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seeds the requests that bring no seed (default: a new one each run)")
    p.add_argument("--rag-index", default=None, metavar="INDEX",
                   help="an index from `astrai-ds rag index` built with this model: adds the model id NAME-rag, whose "
                        "chat completions answer from retrieved chunks and list them in 'sources'")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel GPUs; N > 1 runs under the deepspeed launcher (see above)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="the HTTP server's log (info: one line per request)")


def _check_options(args) -> dict:
    from astrai_ds.cli.model_commands import check_tp_launch, process_rank

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_running < 1:
        raise UserError(f"--max-running must be at least 1, got {args.max_running}")
    if args.max_waiting < 0:
        raise UserError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    for origin in args.allow_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UserError(f"--allow-origin {origin!r} is not a web origin: give scheme and host, as a browser sends "
                            f"them (https://app.example.com, http://localhost:3000), or '*'")
    if args.max_batched_tokens < 1:
        raise UserError(f"--max-batched-tokens must be at least 1, got {args.max_batched_tokens}")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    check_tp_launch(args.tp, NAME)
    if process_rank() == 0:
        _check_bind(args.host, args.port)
    return {**parse_kv_budget(args.kv_budget), "max_num_seqs": args.max_running,
            "max_num_batched_tokens": args.max_batched_tokens}


def run(args) -> int:
    from pathlib import Path

    from astrai_ds.cli.model_commands import load_engine, process_rank
    from astrai_ds.model.io import read_model_config

    options = _check_options(args)
    read_model_config(args.model)  # a wrong folder fails here, before anything loads
    rag_index = None
    if args.rag_index is not None:
        from astrai_ds.rag.index import Index, model_fingerprint

        rag_index = Index.load(args.rag_index)
        rag_index.check_model(model_fingerprint(args.model), args.model)
    engine = load_engine(args, args.tp, **options)
    rank = process_rank()
    if args.tp > 1 and rank != 0:
        from astrai_ds.serve.async_engine import run_follower

        # Rank 0 drains on SIGTERM and then tells this rank to stop; a launcher that signals every rank must
        # not end this one first (rank 0's steps need it).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_follower(engine, _receive)
        _close(args.tp)
        return 0

    if engine.runner.compiled is not None:
        print("compile: compiling the decode steps before serving (one sequence, then a batch)", file=sys.stderr,
              flush=True)
        engine.warm_up()
    from astrai_ds.serve.app import ServerState, allowed_hosts, build_app
    from astrai_ds.serve.async_engine import AsyncEngine
    from astrai_ds.serve.metrics import ServeMetrics

    # The engine thread and the event loop hand the GIL back and forth every token; Python's default 5 ms
    # switch interval makes each wait for the other for up to that long (measured: about 15% of batch-1 speed).
    sys.setswitchinterval(0.001)
    metrics = ServeMetrics()
    async_engine = AsyncEngine(engine, metrics, broadcast=_send if args.tp > 1 else None,
                               max_waiting=args.max_waiting)
    name = args.served_name or Path(args.model).resolve().name
    state = ServerState(async_engine, name, metrics, api_key=args.api_key or os.environ.get("ASTRAI_API_KEY") or None,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), rag_index=rag_index,
                        allowed_hosts=allowed_hosts(args.host, args.allowed_host), open_metrics=args.open_metrics,
                        allow_origins=args.allow_origin)
    async_engine.start()
    try:
        return _serve(build_app(state), state, args)
    finally:
        async_engine.stop(timeout=30)
        _close(args.tp)


def _serve(app, state, args) -> int:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM drains (see the module's help) instead of closing the socket at once; SIGINT as uvicorn does."""

        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and not state.draining:
                state.draining = True
                threading.Thread(target=self._drain, name="astrai-drain", daemon=True).start()
                return
            super().handle_exit(sig, frame)

        def _drain(self):
            print(f"SIGTERM: draining ({state.engine.num_unfinished} requests running, at most "
                  f"{args.drain_timeout:g} s)", file=sys.stderr, flush=True)
            deadline = time.monotonic() + args.drain_timeout
            while (state.engine.num_unfinished or state.active) and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.engine.num_unfinished:
                print(f"drain timeout: aborting {state.engine.num_unfinished} requests", file=sys.stderr, flush=True)
                state.engine.abort_all("the server is shutting down (its drain timeout passed)")
                end = time.monotonic() + 5
                while state.active and time.monotonic() < end:
                    time.sleep(0.05)
            self.should_exit = True

        def watch_engine(self):
            """A failure of the model step itself leaves no engine to serve with: stop, and exit 1 so that a
            supervisor (systemd, Kubernetes, Slurm's requeue) starts the server again."""
            while not self.should_exit:
                if state.engine.error is not None:
                    print(f"the engine failed: {state.engine.error!r}; the server stops and exits 1",
                          file=sys.stderr, flush=True)
                    state.draining = True
                    self.should_exit = True
                    return
                time.sleep(0.2)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level in ("debug", "info"))
    server = DrainingServer(config)
    print(f"serving {state.served_name!r} on http://{args.host}:{args.port} (OpenAI API /v1/chat/completions, "
          f"/v1/completions and /v1/embeddings, Anthropic API /v1/messages, chat page /, metrics /metrics)",
          file=sys.stderr, flush=True)
    threading.Thread(target=server.watch_engine, name="astrai-engine-watch", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind (it logged why)
        if not server.started:
            raise UserError(_bind_error(args.host, args.port)) from None
        raise
    return 1 if state.engine.error is not None else 0


def _bind_error(host: str, port: int, reason: str = "") -> str:
    return (f"cannot listen on {host}:{port}{f' ({reason})' if reason else ''}: the port is in use or the address is "
            f"not one of this machine's; choose another --port or --host")


def _check_bind(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be bound (uvicorn binds again, with SO_REUSEADDR)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(_bind_error(host, port, e.strerror)) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(_bind_error(host, port, e.strerror)) from None


def _send(commands: list) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([commands], src=0)


def _receive() -> list:
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _close(tp: int) -> None:
    if tp > 1:
        from astrai_ds.inference.ds_inference import close_distributed

        close_distributed()
