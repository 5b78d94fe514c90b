"""A compiled decode step: a step in which every scheduled sequence decodes one token runs as one `torch.compile`d
graph (inductor: C++/OpenMP kernels on a CPU, Triton on a GPU) instead of a few hundred eager operations.

Two graphs per model: one with static shapes for a single sequence (generate, chat: where latency matters most) and
one whose batch dimension is dynamic for every larger batch. On a CPU the dynamic-batch graph decodes as fast as
graphs compiled for each batch size (SmolLM2 in bf16: 249 against 279 tokens/s at 8 sequences, 369-411 against
379 at 16, one sample each) while compiling once instead of once per size (about 50 s each for SmolLM2 frozen),
so batches are not padded to size buckets. Each graph is compiled on its first use and kept (inductor caches its
kernels on disk, `extensions.use_compile_cache`). The context length and the size of the KV pool are dynamic too:
one graph for every length, and for every engine over the same model (GRPO builds an engine per rollout). Steps that
prefill run eager: they are few, and bound by matmuls.

With `frozen` weights (an engine whose model never changes: generate, chat, serve, eval) the graph is compiled with
inductor's freezing: the weights become constants of the graph, which on a CPU lowers the linear layers to oneDNN
with prepacked weights (`mkldnn::_linear_pointwise`), and dynamo guards on the parameters' identity, so another
model gets its own graphs. A model updated in place between runs (GRPO's rollout copy) must not be frozen, as its
graph would keep the old weights: there they stay inputs of the graph (tested both ways). Where inductor cannot
compile (a CPU without a C++ compiler, an error), the engine says so in one line and decodes eager.

On a CPU the frozen one-sequence graph takes its matrix-vector products from inductor's C++ GEMM templates
(`max_autotune` between them and ATen's kernel, per shape), which read the weights near the memory's bandwidth:
SmolLM2 decodes one sequence at 43-51 tokens/s in fp32 and 81-86 in bf16, against 19-20 and 47 with oneDNN's
prepacked kernels (the same tokens), for about 40-90 s more of compiling. The dynamic-batch graph keeps oneDNN: with
the templates it decoded 8 sequences at 162-167 tokens/s against 291-306. A one-sequence graph that fails to compile
with the templates is compiled without them.
"""

from __future__ import annotations

import sys

import torch

from astrai_ds.model.kv_cache import AttnGroup, CacheBatch, KVCache


def _decode(model, cache: KVCache, input_ids, position_ids, write_slots, read_slots, mask) -> torch.Tensor:
    """One decode step of b sequences over the paged cache -> float32 logits (b, vocab). input_ids, position_ids:
    (1, b); write_slots (b,); read_slots (b, L); mask (b, 1, 1, L)."""
    b = write_slots.shape[0]
    tokens = torch.arange(b, device=write_slots.device).unsqueeze(1)  # (b, 1): query i is the step's token i
    batch = CacheBatch(cache, write_slots, [AttnGroup(tokens, read_slots, mask)])
    h = model.hidden(input_ids, position_ids, cache=batch)  # (1, b, dim)
    return model.head(h).float()[0]  # (b, vocab)


def _decode_frozen(model, cache, *args):
    return _decode(model, cache, *args)


def _decode_live(model, cache, *args):
    return _decode(model, cache, *args)


_COMPILED: dict[bool, object] = {}  # frozen -> the torch.compile wrapper (two functions, so two caches of graphs)


def _compiled(frozen: bool):
    if frozen not in _COMPILED:
        import torch._dynamo

        # both graphs of every model in the process are entries of one wrapper's cache
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dynamic=False: no dimension turns dynamic by itself; the ones marked in `run` are
        _COMPILED[frozen] = torch.compile(_decode_frozen if frozen else _decode_live, fullgraph=True, dynamic=False)
    return _COMPILED[frozen]


class CompiledDecode:
    """The decode graphs of one engine; `run` returns None for a step it does not take (a prefill in it, or
    compilation off after a failure), and the caller runs that step eager."""

    def __init__(self, runner, frozen: bool = True):
        self.runner = runner
        self.frozen = frozen
        self.fn = _compiled(frozen)
        self.steps = 0  # steps taken compiled (tests and benchmarks read it)
        self.seen: set[str] = set()  # the graphs run at least once ("one", "batch"): the first run of each compiles
        self.failed: str | None = None
        self.no_templates = False  # the one-sequence graph failed to compile with GEMM templates: compiled without
        for pool in runner.cache.k + runner.cache.v:  # a mark stays on the tensor: once per pool, not per step
            torch._dynamo.mark_dynamic(pool, 0)  # the pool's size: one graph for engines of any cache size

    def run(self, scheduled) -> torch.Tensor | None:
        """Float32 logits (b, vocab) of a step whose sequences all decode one token after a cached context, or None.
        (A one-token chunk in the middle of a prompt, which a nearly spent token budget can schedule, samples nothing:
        such a step is not a decode step either.)
        A one-token prompt's first step is left to the eager path: its context length of 1 would make dynamo
        specialise the graph to it and compile two more."""
        if self.failed is not None or not scheduled or any(s.num_new != 1 or s.seq.num_computed == 0 or not s.samples
                                                             for s in scheduled):
            return None
        runner, b = self.runner, len(scheduled)
        group = runner._group([(s, i) for i, s in enumerate(scheduled)])
        positions = [s.seq.num_computed for s in scheduled]
        slots = [runner._slots(s.seq.block_table, p, p + 1)[0] for s, p in zip(scheduled, positions)]
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=runner.device)  # noqa: E731
        args = (as_tensor([[s.seq.token_ids[p] for s, p in zip(scheduled, positions)]]), as_tensor([positions]),
                as_tensor(slots), group.read_slots, group.mask)
        torch._dynamo.mark_dynamic(group.read_slots, 1)  # the context length
        torch._dynamo.mark_dynamic(group.mask, 3)
        graph = "one" if b == 1 else "batch"
        if b > 1:  # the batch size: one graph for all
            for tensor, dim in zip(args, (1, 1, 0, 0, 0)):
                torch._dynamo.mark_dynamic(tensor, dim)
        if graph in self.seen:
            logits = self._call(args, graph)
        else:  # this graph's first step compiles it (or finds it compiled by an earlier engine over the model)
            try:
                try:
                    logits = self._call(args, graph)
                except Exception as e:  # noqa: BLE001
                    if not self._templates(graph):
                        raise
                    self.no_templates = True  # compiled without them; if that fails too, only that is said
                    logits = self._call(args, graph)
                    print(f"compile: the one-sequence decode step could not be compiled with GEMM templates "
                          f"({_first_line(e)}); compiled without them", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 (inductor's errors are many: no compiler, an unsupported op, ...)
                self.failed = _first_line(e)
                print(f"compile: the decode step could not be compiled ({self.failed}); decoding eager",
                      file=sys.stderr, flush=True)
                return None
            self.seen.add(graph)
        self.steps += 1
        return logits

    def _templates(self, graph: str) -> bool:
        """Whether `graph` compiles its matrix products from inductor's C++ GEMM templates (see the module's doc)."""
        return graph == "one" and self.frozen and self.runner.device.type == "cpu" and not self.no_templates

    def _call(self, args, graph: str) -> torch.Tensor:
        import torch._inductor.config

        options = {"freezing": self.frozen}
        if self._templates(graph):  # autotuned between the C++ template and ATen's kernel, per shape
            options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
        with torch._inductor.config.patch(**options):  # read when a graph compiles, inside the call
            return self.fn(self.runner.model, self.runner.cache, *args)


def _first_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]
