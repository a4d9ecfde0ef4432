"""Serving metrics, exported through Ray's metrics agent (names gain a `ray_` prefix, e.g.
`ray_dimoe_serve_batch_size_bucket`); Serve adds the deployment, replica and application tags.

Tags stay low-cardinality: endpoint paths or RPC names, protocols, error kinds and strategies —
never request ids or prompts. Create these objects inside a replica (they need a Ray worker).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from dimoe.serving.errors import error_kind

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
NFE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "dimoe_serve_requests", "Requests received by the ingress.", tag_keys=("endpoint", "protocol")
        )
        self.errors = Counter(
            "dimoe_serve_errors", "Requests answered with an error, by kind.", tag_keys=("endpoint", "kind")
        )

    def request(self, endpoint: str, protocol: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "protocol": protocol})
        if status >= 400:
            self.errors.inc(tags={"endpoint": endpoint, "kind": error_kind(status)})


class DecoderMetrics:
    def __init__(self) -> None:
        self.batch_size = Histogram(
            "dimoe_serve_batch_size", "Requests per batched decoder call.", boundaries=BATCH_BOUNDARIES
        )
        self.queue_wait = Histogram(
            "dimoe_serve_queue_wait_s",
            "Seconds a request waited in the decoder before its batch started.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.decode_latency = Histogram(
            "dimoe_serve_decode_latency_s",
            "Seconds from the start of a request's batch to its last block.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("strategy",),
        )
        self.nfe = Histogram(
            "dimoe_serve_nfe",
            "Forward passes per request.",
            boundaries=NFE_BOUNDARIES,
            tag_keys=("strategy",),
        )
        self.in_flight = Gauge(
            "dimoe_serve_decoder_in_flight", "Requests accepted by the decoder, not answered."
        )
        self.rejected = Counter(
            "dimoe_serve_decoder_rejected", "Jobs the decoder refused or failed, by kind.", tag_keys=("kind",)
        )
