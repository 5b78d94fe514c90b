"""The generation engine shared by many concurrent HTTP requests.

`LLMEngine` is not thread-safe, so one thread owns it: it takes the commands the event loop queued (add a
request, abort one), runs `step()` while any request is unfinished, and hands each request's outputs to the
asyncio queue its caller reads. Requests from every client therefore batch together (continuous batching),
and a client that goes away aborts its request, which frees its KV blocks before the next step.

With tensor parallelism every rank owns a shard of the model and must run the same steps: rank 0 (the one
serving HTTP) broadcasts the commands of each iteration, and the other ranks run `run_follower`, which applies
the same commands to their own engine. Request ids and seeds come from rank 0, so all ranks draw the same tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from astrai_ds.errors import RequestError
from astrai_ds.inference.engine import LLMEngine, RequestOutput
from astrai_ds.inference.sampling import SamplingParams

IDLE_WAIT_S = 1.0  # an idle loop wakes this often (under tensor parallelism: a heartbeat for the other ranks)
EMBED_SLICE_TOKENS = 256  # an embeddings request runs in slices of about this many tokens, one between two steps


class EngineDead(RuntimeError):
    """The engine's thread stopped on an error: no request can be served any more."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str
    reason: str = ""  # set: the caller gets an RequestAborted with this message


@dataclass
class _Stop:
    pass


@dataclass
class _Embed:
    request_id: str
    token_ids: list[list[int]]
    pooling: str


class RequestAborted(Exception):
    """The server aborted a request (shutting down after the drain timeout)."""


class RequestFailed(Exception):
    """One request failed while it was prepared or sampled (its blocks are freed); the engine goes on."""


class Overloaded(Exception):
    """More requests wait than the server's --max-waiting: the caller should try again later."""


@dataclass
class _Waiter:
    """Where a request's outputs go: an asyncio queue read on the event loop."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    added: concurrent.futures.Future
    arrival: float = field(default_factory=time.perf_counter)
    last: float | None = None  # time of the previous output with tokens


class AsyncEngine:
    """Runs `engine` on its own thread; `add` and `outputs` are called from the event loop."""

    def __init__(self, engine: LLMEngine, metrics=None, broadcast: Callable[[list], list] | None = None,
                 max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting  # requests waiting for their first step at most (None: no bound)
        self.metrics = metrics  # serve.metrics.ServeMetrics or None
        self._broadcast = broadcast  # tensor parallelism: sends rank 0's commands to the other ranks
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[str, _Waiter] = {}  # touched by the engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="astrai-engine", daemon=True)
        self.error: BaseException | None = None
        self.num_unfinished = 0  # requests added and not finished (read by the drain loop)
        # Set by the engine thread after each iteration: the requests the scheduler holds back, and the running
        # slots still free (a new request that fills one does not wait).
        self.num_waiting = 0
        self.free_slots = engine.config.max_num_seqs
        self._queued = 0  # requests put on the command queue and not taken yet (the event loop's count)
        # Held while the event loop checks that the engine lives and queues a command, and while the engine thread
        # ends: a command is either taken by the loop or refused when it ends, never left behind.
        self._lock = threading.Lock()
        self._ended = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread (after the current step); unfinished requests are dropped."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._ended

    def _put(self, item) -> None:
        """Queue one command (or several that must reach the engine in the same iteration, as a list)."""
        with self._lock:
            if not self.alive:
                raise EngineDead(f"the engine stopped: {self.error!r}" if self.error else "the engine was stopped")
            self._commands.put(item)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # ------------------------------------------------------------------ the event loop's side

    async def add(self, requests: list[tuple[str, list[int], SamplingParams]], outputs: asyncio.Queue) -> None:
        """Queue (request_id, prompt_ids, params) requests whose outputs all go to `outputs` (the choices of `n`
        share one queue); they reach the engine in the same iteration, so they start in the same step. Returns
        once the engine took them all; if it refuses one, the others are aborted and its RequestError raised.
        Raises Overloaded, and queues nothing, when they would make more than `max_waiting` requests wait."""
        waiting = self.num_waiting + self._queued
        if self.max_waiting is not None and waiting + len(requests) - self.free_slots > self.max_waiting:
            raise Overloaded(f"the server is at capacity ({waiting} requests are waiting for a free slot, at most "
                             f"{self.max_waiting}): try again shortly")
        loop = asyncio.get_running_loop()
        waiters = [_Waiter(loop, outputs, concurrent.futures.Future()) for _ in requests]
        self._put([(_Add(request_id, prompt_ids, params), waiter)
                   for (request_id, prompt_ids, params), waiter in zip(requests, waiters)])
        self._queued += len(requests)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(w.added) for w in waiters), return_exceptions=True)
        except asyncio.CancelledError:  # the client went away meanwhile: nobody will read these outputs
            for request_id, _, _ in requests:
                self.abort(request_id)
            raise
        finally:
            self._queued -= len(requests)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for (request_id, _, _), result in zip(requests, results):
                if not isinstance(result, BaseException):
                    self.abort(request_id)
            raise errors[0]

    async def embed(self, token_ids: list[list[int]], pooling: str = "mean"):
        """Embeddings (n, dim) of token sequences, computed by the engine thread between two steps (the model
        is the engine's: no second copy, and every tensor-parallel rank runs it too). A large request runs in
        slices of about EMBED_SLICE_TOKENS tokens, one per engine iteration, so the running generations keep
        stepping in between."""
        import numpy as np

        parts = []
        for piece in _slices(token_ids, EMBED_SLICE_TOKENS):
            done = concurrent.futures.Future()
            self._put((_Embed(self.new_id("emb"), piece, pooling), done))
            parts.append(await asyncio.wrap_future(done))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def abort(self, request_id: str, reason: str = "") -> None:
        """Stop a request at the next step and free its blocks (thread-safe; a no-op once finished or once the
        engine has stopped)."""
        self._commands.put(_Abort(request_id, reason))

    def abort_all(self, reason: str) -> None:
        self._commands.put(_Abort("*", reason))

    async def outputs(self, queue_: asyncio.Queue, request_ids: list[str]) -> AsyncIterator[RequestOutput]:
        """The outputs of `request_ids` (all feeding `queue_`) as they come, until each has finished.
        Leaving early (a client that disconnected) aborts the unfinished ones."""
        open_ids = set(request_ids)
        try:
            while open_ids:
                out = await queue_.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    open_ids.discard(out.request_id)
                yield out
        finally:
            for request_id in open_ids:
                self.abort(request_id)

    # ------------------------------------------------------------------ the engine thread

    def _take(self, block: bool) -> list:
        items = []
        try:
            items.append(self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait())
            while True:
                items.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return [c for item in items for c in (item if isinstance(item, list) else [item])]

    def _run(self) -> None:
        try:
            while True:
                taken = self._take(block=not self.engine.has_unfinished())
                commands = [c[0] if isinstance(c, tuple) else c for c in taken]
                if self._broadcast is not None:
                    self._broadcast(commands)
                waiters = {c[0].request_id: c[1] for c in taken if isinstance(c, tuple)}
                if apply_commands(self.engine, commands, self._on_add(waiters), self._on_abort,
                                  self._on_embed(waiters)):
                    with self._lock:
                        self._ended = True
                        self._refuse_queued(EngineDead("the engine was stopped"))
                    for waiter in waiters.values():  # taken with the stop, after it
                        future = waiter.added if isinstance(waiter, _Waiter) else waiter
                        if not future.done():
                            future.set_exception(EngineDead("the engine was stopped"))
                    return
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                scheduler = self.engine.scheduler
                self.num_waiting = len(scheduler.waiting)
                self.free_slots = max(scheduler.max_num_seqs - len(scheduler.running) - len(scheduler.waiting), 0)
                if self.metrics is not None:
                    self.metrics.observe_engine(self.engine)
        except BaseException as e:  # the engine is unusable: fail every caller rather than leave them waiting
            with self._lock:
                self.error = e
                self._refuse_queued(EngineDead(f"the engine failed: {e!r}"))
            for waiter in self._waiters.values():
                waiter.loop.call_soon_threadsafe(waiter.outputs.put_nowait, EngineDead(f"the engine failed: {e!r}"))
            self._waiters.clear()
            self.num_unfinished = 0
            if self._broadcast is not None:  # the other ranks stop too (a normal stop was broadcast already)
                try:
                    self._broadcast([_Stop()])
                except Exception:
                    pass
            raise

    def _refuse_queued(self, error: BaseException) -> None:
        """Fail the requests still queued when the loop ends (their callers would otherwise wait for ever)."""
        for command in self._take(block=False):
            if isinstance(command, tuple):
                future = command[1].added if isinstance(command[1], _Waiter) else command[1]
                if not future.done():
                    future.set_exception(error)

    def _on_add(self, waiters: dict[str, _Waiter]):
        def on_add(command: _Add, error: RequestError | None) -> None:
            waiter = waiters[command.request_id]
            if error is not None:
                waiter.added.set_exception(error)
                return
            self._waiters[command.request_id] = waiter
            self.num_unfinished += 1
            waiter.added.set_result(None)
        return on_add

    @staticmethod
    def _on_embed(waiters: dict):
        def on_embed(command: _Embed, result) -> None:
            future = waiters[command.request_id]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        return on_embed

    def _on_abort(self, request_id: str, reason: str) -> None:
        waiter = self._waiters.pop(request_id, None)
        if waiter is None:
            return
        self.num_unfinished -= 1
        if self.metrics is not None:
            self.metrics.finished("abort", 0)
        if reason:
            waiter.loop.call_soon_threadsafe(waiter.outputs.put_nowait, RequestAborted(reason))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their callers: one wake-up of each event loop per step, not per output."""
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            waiter = self._waiters.get(out.request_id)
            if waiter is None:  # aborted by its caller in the meantime
                continue
            if self.metrics is not None and out.token_ids:
                self.metrics.token(now - (waiter.last if waiter.last is not None else waiter.arrival),
                                   first=waiter.last is None, count=len(out.token_ids))
                waiter.last = now
            if out.finished:
                del self._waiters[out.request_id]
                self.num_unfinished -= 1
                if self.metrics is not None:
                    self.metrics.finished(out.finish_reason, out.prompt_tokens)
            if out.finish_reason == "error":
                out = RequestFailed(f"the request failed: {out.error}")
            by_loop.setdefault(waiter.loop, []).append((waiter.outputs, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _slices(token_ids: list[list[int]], tokens: int) -> list[list[list[int]]]:
    """Consecutive runs of `token_ids` of about `tokens` tokens each (a longer sequence alone)."""
    out, size = [[]], 0
    for ids in token_ids:
        if out[-1] and size + len(ids) > tokens:
            out.append([])
            size = 0
        out[-1].append(ids)
        size += len(ids)
    return out


def _put_all(items: list) -> None:
    for queue_, out in items:
        queue_.put_nowait(out)


def apply_commands(engine: LLMEngine, commands: list, on_add=None, on_abort=None, on_embed=None) -> bool:
    """Apply one iteration's commands to `engine` (every rank applies the same); True when told to stop."""
    for command in commands:
        if isinstance(command, _Stop):
            return True
        if isinstance(command, _Add):
            try:
                engine.add_request(command.prompt_ids, command.params, command.request_id)
                error = None
            except RequestError as e:
                error = e
            except Exception as e:  # a request that cannot be prepared fails alone, not the engine thread
                error = RequestFailed(f"the request could not be prepared: {e!r}")
            if on_add is not None:
                on_add(command, error)
        elif isinstance(command, _Embed):
            from astrai_ds.inference.embed import Embedder

            try:
                result = Embedder(engine.model, engine.tokenizer, command.pooling).embed_ids(command.token_ids)
            except Exception as e:  # a bad input must not end the engine thread
                result = e
            if on_embed is not None:
                on_embed(command, result)
        elif isinstance(command, _Abort):
            ids = engine.unfinished_ids() if command.request_id == "*" else [command.request_id]
            for request_id in ids:
                engine.abort(request_id)
                if on_abort is not None:
                    on_abort(request_id, command.reason)
    return False


def run_follower(engine: LLMEngine, receive: Callable[[], list]) -> None:
    """A tensor-parallel rank other than 0: apply rank 0's commands and step with it until it stops."""
    while True:
        if apply_commands(engine, receive()):
            return
        if engine.has_unfinished():
            engine.step()
