"""Prometheus metrics of one app: request counts and latencies per route, query stages, index and model.

Each app has its own registry, so two apps in one process (tests, a reload) never collide."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STAGE_NAMES = {"header_check": "decode", "decode_preprocess": "decode", "embed": "embed", "search": "search",
               "encoder_load": "load", "index_load": "load"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mretrieve_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("mretrieve_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("mretrieve_stage_seconds", "Query stage latency (decode, embed, search, load)",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.index_vectors = Gauge("mretrieve_index_vectors", "Vectors in the serving index",
                                   registry=self.registry)
        self.model = Info("mretrieve_live_model", "The model serving queries", registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_stages(self, stages: dict[str, float]) -> None:
        merged: dict[str, float] = {}
        for name, seconds in stages.items():
            stage = STAGE_NAMES.get(name, name)
            merged[stage] = merged.get(stage, 0.0) + seconds
        for stage, seconds in merged.items():
            self.stages.labels(stage).observe(seconds)

    def set_serving(self, model_key: str, encoder: str, index_type: str, ntotal: int) -> None:
        self.index_vectors.set(ntotal)
        self.model.info({"model_key": model_key, "encoder": encoder, "index_type": index_type})

    def render(self) -> bytes:
        return generate_latest(self.registry)
