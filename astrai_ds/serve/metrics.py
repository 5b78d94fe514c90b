"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "astrai"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests holding KV blocks and stepped", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests queued or preempted", registry=r)
        self.blocks_used = Gauge(f"{PREFIX}_kv_cache_blocks_used", "KV cache blocks held by requests", registry=r)
        self.blocks_free = Gauge(f"{PREFIX}_kv_cache_blocks_free",
                                 "KV cache blocks free (prefix-cached ones included: they are evictable)",
                                 registry=r)
        self.prefix_hit_rate = Gauge(f"{PREFIX}_prefix_cache_hit_rate",
                                     "Share of looked-up prompt tokens served from the prefix cache", registry=r)
        self.preemptions = Counter(f"{PREFIX}_preemptions", "Requests preempted (recomputed later)", registry=r)
        self._preempted = 0  # the scheduler's count when last observed
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter(f"{PREFIX}_requests_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Between a request's consecutive tokens",
                              buckets=TPOT_BUCKETS, registry=r)

    def observe_engine(self, engine) -> None:
        blocks, scheduler = engine.blocks, engine.scheduler
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.blocks_free.set(blocks.num_free_blocks)
        self.blocks_used.set(blocks.num_blocks - blocks.num_free_blocks)
        query = blocks.stats["prefix_query_tokens"]
        self.prefix_hit_rate.set(blocks.stats["prefix_hit_tokens"] / query if query else 0.0)
        self.preemptions.inc(scheduler.num_preemptions - self._preempted)
        self._preempted = scheduler.num_preemptions

    def token(self, seconds: float, first: bool, count: int) -> None:
        """A request's output with `count` new tokens, `seconds` after its arrival (first) or its last output."""
        (self.ttft if first else self.tpot).observe(seconds)
        self.generated_tokens.inc(count)

    def finished(self, finish_reason: str | None, prompt_tokens: int) -> None:
        self.requests.labels(finish_reason or "abort").inc()
        self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
