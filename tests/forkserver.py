"""The test suite's fork server: a process that imports torch, DeepSpeed (with torch._dynamo, which DeepSpeed's
optimizer checks import) and astrai_ds once, then forks the ranks that the tests start directly (conftest
`run_ranks`). Each rank is a process of its own with its own arguments, environment, working folder and output
files, running its script or module as `python -u SCRIPT ARGS` would (as `__main__`, sys.argv and sys.path[0] set
alike), without paying those imports again: about 3 s of CPU a rank, 6 s a launch of two on 2 cores.

Protocol, one JSON object a line: requests on stdin {"argv": [SCRIPT, ARGS...], "module": bool, "env": {...},
"cwd": DIR, "stdout": FILE, "stderr": FILE}; answers on stdout {"ready": true} once, then {"pid": N} for each
request and {"pid": N, "exit": CODE} when that rank ends (CODE negative: killed by that signal, as Popen says).
What the imports print goes to stderr. Nothing runs in this process but the imports: it starts no thread and
computes no tensor before a fork (torch's import leaves one thread of its own, as in the parents that DataLoader
workers are forked from)."""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import sys
import traceback


def preload() -> None:
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.pipe.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

    import astrai_ds.cli.main  # noqa: F401
    import astrai_ds.training.run  # noqa: F401


def run_child(request: dict) -> None:
    """In the forked child: become the rank the request describes, run it, and end the process with its code."""
    code = 1
    try:
        PROTOCOL.close()
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP when it loaded, here in the server
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.close(null)
        sys.argv = list(request["argv"])
        target = sys.argv[0]
        if request["module"]:
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (what the interpreter itself would print)
        traceback.print_exc()
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


PROTOCOL = None  # the answers' stream: this process's stdout as it was started, before `main` redirects fd 1


def answer(message: dict) -> None:
    PROTOCOL.write(json.dumps(message) + "\n")
    PROTOCOL.flush()


def main() -> None:
    global PROTOCOL
    # Ctrl-C reaches the whole process group: the session stops its ranks and hears of their ends from here, and
    # ends this server by closing its stdin. (Each rank takes the default handler back.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    PROTOCOL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the imports print (DeepSpeed logs to stdout) goes to stderr, not into the answers
    preload()
    answer({"ready": True})
    running: set[int] = set()
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:  # the test session is gone: leave the ranks still running to end on their own
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_child(request)
                running.add(pid)
                answer({"pid": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                answer({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
