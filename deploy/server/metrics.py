"""Prometheus metrics for ``/metrics``, in a registry of the app's own.

A registry per app (not the process-global one) lets several servers live in one
process, as in tests, without duplicate-metric errors.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds: from a sub-millisecond health check to a long batch on a slow CPU.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, model_name: str, providers: list[str]):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kdtool_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kdtool_request_duration_seconds",
            "Time from request start to response, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kdtool_queue_duration_seconds",
            "Time a request waited in the batching queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "kdtool_inference_duration_seconds",
            "ONNX Runtime time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kdtool_batch_size", "Images per ONNX Runtime call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("kdtool_inferred_images", "Images run through the model.", registry=r)
        self.queued = Gauge(
            "kdtool_queue_images", "Images waiting in the batching queue.", registry=r
        )
        self.rejected = Counter(
            "kdtool_rejected_images",
            "Images refused with 503 because the queue was full.",
            registry=r,
        )
        info = Gauge(
            "kdtool_model_info", "The served model (value 1).", ["model", "providers"], registry=r
        )
        info.labels(model_name, ",".join(providers)).set(1)

    def observe_batch(self, size: int, compute_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(size)
        self.compute_time.observe(compute_s)
        self.images.inc(size)
        for q in queue_s:
            self.queue_time.observe(q)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
