"""The metrics catalogue against the real Ray metric objects that training telemetry and serving
create and record (spied on at `ray.util.metrics`, not read from the source), and its import cost."""

import subprocess
import sys
from pathlib import Path

import pytest

from dimoe.telemetry.catalogue import METRICS, SERVE_TAGS, SERVING_METRICS, TRAINING_METRICS, Metric

KINDS = ("counter", "gauge", "histogram")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


class Spy:
    """Every Ray metric object created, and every value recorded: (name, tags)."""

    def __init__(self) -> None:
        self.created: list = []
        self.recorded: list[tuple[str, dict[str, str]]] = []


@pytest.fixture
def spy(monkeypatch) -> Spy:
    from ray.util import metrics

    found = Spy()
    create = metrics.Metric.__init__

    def spied_init(self, *args, **kwargs) -> None:
        create(self, *args, **kwargs)
        found.created.append(self)

    monkeypatch.setattr(metrics.Metric, "__init__", spied_init)
    # Serve's classes add their tags and call these, so serving values are seen here too.
    for cls, method in ((metrics.Counter, "inc"), (metrics.Gauge, "set"), (metrics.Histogram, "observe")):
        record = getattr(cls, method)

        def spied(self, value, tags=None, _record=record) -> None:
            found.recorded.append((self._name, dict(tags or {})))
            _record(self, value, tags)

        monkeypatch.setattr(cls, method, spied)
    return found


def kind_of(metric) -> str:
    from ray.util import metrics

    return next(kind for kind in KINDS if isinstance(metric, getattr(metrics, kind.title())))


def routing_record() -> dict:
    """One two-view `routing_stats` step: 2 layers, 2 t-buckets, 3 experts."""
    return {
        "expert_load": [[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]], [[1 / 3] * 3, [1 / 3] * 3]],
        "bucket_tokens": [4.0, 6.0],
        "router_entropy": [0.7, 1.1],
        "topk_overlap": [0.8, 0.9],
    }


def test_training_and_serving_create_and_record_only_catalogue_metrics(spy: Spy) -> None:
    from ray.serve import metrics as serve_metrics

    from dimoe.serving.metrics import DecoderMetrics, IngressMetrics
    from dimoe.train.telemetry import RoutingGauges

    RoutingGauges("stage2_full").publish({"loss": 1.2, "loss_bal": 0.1, "grad_norm": 3.0}, routing_record())
    ingress = IngressMetrics()
    ingress.request("/v1/completions", "http", 200)
    ingress.request("/v1/completions", "http", 503)
    DecoderMetrics()  # recorded by serve/decoder.py inside a replica

    created = {metric.info["name"]: metric for metric in spy.created}
    assert len(created) == len(spy.created), "a metric was created twice"
    assert set(created) == set(METRICS), "every catalogue metric is created by the code, and nothing else"
    for name, metric in created.items():
        entry = METRICS[name]
        assert kind_of(metric) == entry.kind, name
        assert tuple(metric.info["tag_keys"]) == entry.tag_keys, name
        assert metric.info["description"] == entry.description, name
        assert list(metric.info.get("boundaries", [])) == list(entry.boundaries), name
        assert isinstance(metric, serve_metrics.Counter | serve_metrics.Gauge | serve_metrics.Histogram) == (
            entry.serve
        ), f"{name}: serving metrics go through ray.serve.metrics (its replica tags), training ones not"

    for name, tags in spy.recorded:
        assert set(tags) == set(METRICS[name].tag_keys), (name, tags)
    recorded = {name for name, _ in spy.recorded}
    assert recorded == {m.name for m in TRAINING_METRICS} | {"dimoe_serve_requests", "dimoe_serve_errors"}


def test_entries_are_unique_and_named_by_their_side() -> None:
    assert len(METRICS) == len(TRAINING_METRICS) + len(SERVING_METRICS), "two entries share a name"
    assert all(m.name.startswith("dimoe_") and not m.serve for m in TRAINING_METRICS)
    assert all(m.name.startswith("dimoe_serve_") and m.serve for m in SERVING_METRICS)
    assert all(m.unit and m.description and m.kind in KINDS for m in METRICS.values())


def test_exported_series_and_tags() -> None:
    nfe = METRICS["dimoe_serve_nfe"]
    assert nfe.series == (
        "ray_dimoe_serve_nfe_bucket",
        "ray_dimoe_serve_nfe_sum",
        "ray_dimoe_serve_nfe_count",
    )
    assert nfe.tags == (*SERVE_TAGS, "strategy")
    assert METRICS["dimoe_serve_requests"].series == ("ray_dimoe_serve_requests_total",)
    load = METRICS["dimoe_expert_load"]
    assert load.series == ("ray_dimoe_expert_load",) and load.tags == ("stage", "layer", "expert")


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "histogram"},  # no boundaries
        {"kind": "gauge", "boundaries": (1.0,)},
        {"kind": "histogram", "boundaries": (2.0, 1.0)},
        {"kind": "histogram", "boundaries": (0.0, 1.0)},
        {"kind": "summary"},
        {"kind": "counter", "tag_keys": ("replica",), "serve": True},
        {"kind": "gauge", "name": "dimoe_wait_s", "unit": "seconds"},  # Prometheus: `_seconds`
    ],
)
def test_malformed_entries_are_refused(fields: dict) -> None:
    with pytest.raises(ValueError):
        Metric(**{"name": "dimoe_x", "unit": "1", "description": "x", **fields})


def test_durations_are_named_in_seconds() -> None:
    durations = [metric for metric in METRICS.values() if metric.unit == "seconds"]
    assert durations and all(metric.name.endswith("_seconds") for metric in durations)
    assert Metric("dimoe_wait_seconds", "gauge", "seconds", "x").name == "dimoe_wait_seconds"


def test_catalogue_and_dashboard_need_no_ray() -> None:
    code = (
        "import sys\n"
        "import dimoe.telemetry.catalogue\n"
        "from dimoe.dashboards import build_dashboard\n"
        "build_dashboard()\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_docs_table_lists_the_catalogue() -> None:
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`dimoe_"):
            name, kind, tags, unit, _ = cells
            rows[name.strip("`")] = (kind, tuple(tag.strip() for tag in tags.split(",") if tag.strip()), unit)
    assert rows == {m.name: (m.kind, m.tag_keys, m.unit) for m in METRICS.values()}
