"""Serving metrics, exported through Ray's metrics agent (names gain a `ray_` prefix, e.g.
`ray_dimoe_serve_batch_size_bucket`); Serve adds the deployment, replica and application tags.

Names, tags and buckets are declared in `dimoe.telemetry.catalogue`. Tags stay low-cardinality:
endpoint paths or RPC names, protocols, error kinds and strategies — never request ids or prompts.
Create these objects inside a replica (they need a Ray worker).
"""

from __future__ import annotations

from dimoe.serving.errors import error_kind
from dimoe.telemetry import catalogue


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = catalogue.SERVE_REQUESTS.create()
        self.errors = catalogue.SERVE_ERRORS.create()

    def request(self, endpoint: str, protocol: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "protocol": protocol})
        if status >= 400:
            self.errors.inc(tags={"endpoint": endpoint, "kind": error_kind(status)})


class DecoderMetrics:
    """Recorded by the decoder deployment (`dimoe.serving.decoder_deployment`)."""

    def __init__(self) -> None:
        self.batch_size = catalogue.BATCH_SIZE.create()
        self.queue_wait = catalogue.QUEUE_WAIT.create()
        self.decode_latency = catalogue.DECODE_LATENCY.create()
        self.nfe = catalogue.NFE.create()
        self.in_flight = catalogue.DECODER_IN_FLIGHT.create()
        self.rejected = catalogue.DECODER_REJECTED.create()
