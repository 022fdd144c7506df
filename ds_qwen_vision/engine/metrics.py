"""The engine's Prometheus metrics, in one registry (`GET /metrics` appends them to the front's)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class EngineMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        # outcome: completed, rejected (400 from the engine), queue_full, cancelled, failed (500 or 503)
        self.requests = Counter("dsqv_engine_requests", "Requests finished by the engine, by outcome",
                                ["outcome"], registry=r)
        self.ttft = Histogram("dsqv_time_to_first_token_seconds", "Queueing + prefill until the first token",
                              registry=r, buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        # the gap a streaming client sees between two tokens (tokens of one speculative step: 0 apart)
        self.itl = Histogram("dsqv_inter_token_seconds", "Time between two consecutive tokens of one sequence",
                             registry=r, buckets=(.005, .01, .02, .035, .05, .075, .1, .15, .25, .5, 1, 2.5, 10))
        self.tokens = Counter("dsqv_generated_tokens", "Tokens generated", registry=r)
        self.tps = Gauge("dsqv_tokens_per_second", "Generated tokens per second over the last step", registry=r)
        self.queue = Gauge("dsqv_queue_depth", "Requests waiting for a slot", registry=r)
        self.in_flight = Gauge("dsqv_in_flight", "Requests being generated", registry=r)
        self.step = Histogram("dsqv_step_seconds", "Wall time of one engine step", registry=r,
                              buckets=(.005, .01, .02, .05, .1, .25, .5, 1, 2.5, 10))
        self.blocks_used = Gauge("dsqv_kv_blocks_used", "KV cache blocks held (sequences and prefix snapshots)",
                                 registry=r)
        self.blocks_free = Gauge("dsqv_kv_blocks_free", "KV cache blocks free", registry=r)
        # what the memory planner chose (runner/memory.py), constant after start-up
        self.kv_capacity = Gauge("dsqv_kv_capacity_tokens", "Tokens of KV all sequences together can hold",
                                 registry=r)
        self.max_sequences = Gauge("dsqv_max_sequences", "Sequences generated at once at most (GDN state rows)",
                                   registry=r)
        self.waiting_memory = Gauge("dsqv_waiting_for_memory", "Sequences waiting for free KV blocks", registry=r)
        self.memory_waits = Counter("dsqv_memory_waits", "Times a sequence waited in line for free KV blocks",
                                    registry=r)

    def outcome(self, what: str) -> None:
        self.requests.labels(what).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()
