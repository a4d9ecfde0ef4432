"""The one catalogue of DiMoE-VL's Ray metrics: every metric declared once, as data.

Training telemetry (`dimoe.train.telemetry.RoutingGauges`) and serving (`dimoe.serving.metrics`)
create their metric objects from these entries (`Metric.create`), and the Grafana dashboard
(`dimoe.dashboards.grafana`) builds its queries from them, so a metric's name, type, tags and
buckets live in exactly one place. To add a metric: declare it here, list it in `METRICS`, create it
with `.create()` where it is recorded, and give it a panel (a test fails for an unplotted metric).

Ray exports every metric with a `ray_` prefix: a counter as `<name>_total`, a gauge as `<name>`, a
histogram as `<name>_bucket`, `<name>_sum` and `<name>_count` (`Metric.series`). Metrics recorded in
a Ray Serve replica (`serve=True`) are created through `ray.serve.metrics`, which adds Serve's
deployment, replica and application tags.

Light on purpose: Ray is imported only when a metric object is created, so the dashboard builder and
tests read the catalogue without a Ray worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]

PROMETHEUS_PREFIX = "ray_"
KIND_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
SERVE_TAGS = ("deployment", "replica", "application")


@dataclass(frozen=True)
class Metric:
    """One Ray metric.

    `unit` is the unit of a recorded value: a base unit (`seconds`, `ratio` for a fraction in [0, 1],
    `bits`, `nats`), the thing counted (`requests`, `jobs`, `forward_passes`), or `1` for a
    dimensionless number. `tag_keys` are the tags the code sets; `tags` adds the ones Serve adds."""

    name: str  # as Ray is given it, without the `ray_` prefix Ray exports it with
    kind: Kind
    unit: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds, increasing
    serve: bool = False  # recorded inside a Ray Serve replica

    def __post_init__(self) -> None:
        # Checked at import, so a malformed entry fails every test rather than a running replica.
        if self.kind not in KIND_SUFFIXES:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"{self.name}: histograms, and only histograms, need boundaries")
        if list(self.boundaries) != sorted(set(self.boundaries)) or any(b <= 0 for b in self.boundaries):
            raise ValueError(f"{self.name}: boundaries must be positive and strictly increasing")
        if self.unit == "seconds" and not self.name.endswith("_seconds"):
            raise ValueError(f"{self.name}: Prometheus names a duration in seconds `..._seconds`")
        if self.serve and set(self.tag_keys) & set(SERVE_TAGS):
            raise ValueError(f"{self.name}: {', '.join(SERVE_TAGS)} are reserved by Ray Serve")

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag of the exported series: Serve's tags (for serving metrics), then `tag_keys`."""
        return (SERVE_TAGS if self.serve else ()) + self.tag_keys

    @property
    def series(self) -> tuple[str, ...]:
        """The Prometheus series names Ray exports for this metric."""
        return tuple(PROMETHEUS_PREFIX + self.name + suffix for suffix in KIND_SUFFIXES[self.kind])

    def create(self) -> Any:
        """A new Ray metric object for this entry (`ray.util.metrics`, or `ray.serve.metrics` for a
        serving metric). Call it where the metric is recorded: in a Ray worker or Serve replica."""
        if self.serve:
            from ray.serve import metrics
        else:
            from ray.util import metrics

        if self.kind == "histogram":
            return metrics.Histogram(
                self.name, self.description, boundaries=list(self.boundaries), tag_keys=self.tag_keys
            )
        factory = metrics.Counter if self.kind == "counter" else metrics.Gauge
        return factory(self.name, self.description, tag_keys=self.tag_keys)


# -- training: set by rank 0 every `log_every` steps (dimoe.train.telemetry.RoutingGauges) ---------
EXPERT_LOAD = Metric(
    "dimoe_expert_load",
    "gauge",
    "ratio",
    "Fraction of a layer's top-k assignments of visible tokens that go to the expert "
    "(token-weighted over t-buckets)",
    ("stage", "layer", "expert"),
)
ROUTER_ENTROPY = Metric(
    "dimoe_router_entropy",
    "gauge",
    "nats",
    "Mean entropy of the router distribution over visible tokens",
    ("stage", "layer"),
)
VIEW_CONSISTENCY = Metric(
    "dimoe_view_consistency",
    "gauge",
    "ratio",
    "Mean Jaccard overlap of a visible token's top-k experts in the two views (problem B); "
    "not set for one-view stages",
    ("stage", "layer"),
)
ROUTING_NONSTATIONARITY = Metric(
    "dimoe_routing_nonstationarity",
    "gauge",
    "bits",
    "Mean JS divergence (bits) of each t-bucket's expert load from the all-bucket mean (problem A)",
    ("stage", "layer"),
)
TRAIN_LOSS = Metric(
    "dimoe_train_loss",
    "gauge",
    "1",
    "Weighted loss terms of rank 0's last micro-batch",
    ("stage", "term"),
)

# -- serving: recorded in Ray Serve replicas (dimoe.serving.metrics) ------------------------------
# Shared bucket bounds: latencies from 5 ms to 30 s; batch sizes and NFE in powers of two.
LATENCY_BOUNDARIES_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)
NFE_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

SERVE_REQUESTS = Metric(
    "dimoe_serve_requests",
    "counter",
    "requests",
    "Requests received by the ingress",
    ("endpoint", "protocol"),
    serve=True,
)
SERVE_ERRORS = Metric(
    "dimoe_serve_errors",
    "counter",
    "requests",
    "Requests answered with an error, by kind",
    ("endpoint", "kind"),
    serve=True,
)
DECODER_REJECTED = Metric(
    "dimoe_serve_decoder_rejected",
    "counter",
    "jobs",
    "Jobs the decoder refused or failed, by kind",
    ("kind",),
    serve=True,
)
DECODE_LATENCY = Metric(
    "dimoe_serve_decode_latency_seconds",
    "histogram",
    "seconds",
    "Seconds from the start of a request's batch to its last block",
    ("strategy",),
    LATENCY_BOUNDARIES_S,
    serve=True,
)
QUEUE_WAIT = Metric(
    "dimoe_serve_queue_wait_seconds",
    "histogram",
    "seconds",
    "Seconds a request waited in the decoder before its batch started",
    (),
    LATENCY_BOUNDARIES_S,
    serve=True,
)
BATCH_SIZE = Metric(
    "dimoe_serve_batch_size",
    "histogram",
    "requests",
    "Requests per batched decoder call",
    (),
    BATCH_BOUNDARIES,
    serve=True,
)
NFE = Metric(
    "dimoe_serve_nfe",
    "histogram",
    "forward_passes",
    "Forward passes per request",
    ("strategy",),
    NFE_BOUNDARIES,
    serve=True,
)
DECODER_IN_FLIGHT = Metric(
    "dimoe_serve_decoder_in_flight",
    "gauge",
    "requests",
    "Requests accepted by the decoder, not answered",
    serve=True,
)

TRAINING_METRICS = (EXPERT_LOAD, ROUTER_ENTROPY, VIEW_CONSISTENCY, ROUTING_NONSTATIONARITY, TRAIN_LOSS)
SERVING_METRICS = (
    SERVE_REQUESTS,
    SERVE_ERRORS,
    DECODER_REJECTED,
    DECODE_LATENCY,
    QUEUE_WAIT,
    BATCH_SIZE,
    NFE,
    DECODER_IN_FLIGHT,
)
# Every metric, by name (a test checks that no two entries share one: Ray would merge them).
METRICS: dict[str, Metric] = {metric.name: metric for metric in TRAINING_METRICS + SERVING_METRICS}
