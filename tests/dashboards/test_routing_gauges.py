"""`RoutingGauges.publish` sets the non-stationarity gauge to problem A of the step's routing
(no Ray: `ray.util.metrics.Gauge` is replaced by a recorder)."""

import pytest

from dimoe.diag.stats import js_divergence
from dimoe.train.telemetry import RoutingGauges


class RecordingGauge:
    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys, self.values = name, tag_keys, {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values[tuple(sorted(tags.items()))] = value


@pytest.fixture
def gauges(monkeypatch):
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", RecordingGauge)
    return RoutingGauges("stage2_full")


def routing(layer0: list[list[float]], layer1: list[list[float]], tokens: list[int]) -> dict:
    return {
        "expert_load": [layer0, layer1],
        "bucket_tokens": tokens,
        "router_entropy": [1.0, 1.2],
        "topk_overlap": None,
    }


def value(gauge: RecordingGauge, layer: int) -> float | None:
    return gauge.values.get((("layer", str(layer)), ("stage", "stage2_full")))


def test_nonstationarity_is_js_of_each_bucket_from_the_token_weighted_mean(gauges):
    gauges.publish({"loss": 1.0}, routing([[0.5, 0.5], [0.5, 0.5]], [[0.9, 0.1], [0.1, 0.9]], [10, 30]))
    assert value(gauges.nonstationarity, 0) == 0.0  # both buckets route alike: no drift with t
    mean = [(10 * 0.9 + 30 * 0.1) / 40, (10 * 0.1 + 30 * 0.9) / 40]
    expected = (js_divergence([0.9, 0.1], mean) + js_divergence([0.1, 0.9], mean)) / 2
    assert value(gauges.nonstationarity, 1) == pytest.approx(expected)
    assert 0 < expected <= 1
    assert value(gauges.entropy, 1) == 1.2 and gauges.overlap.values == {}
    loads = {key: v for key, v in gauges.load.values.items() if ("layer", "1") in key}
    assert sorted(loads.values()) == pytest.approx(sorted(mean))


def test_empty_buckets_are_left_out_and_an_empty_step_sets_nothing(gauges):
    gauges.publish({}, routing([[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]], [0, 5]))
    assert value(gauges.nonstationarity, 0) == 0.0  # one non-empty bucket equals its own mean
    gauges.nonstationarity.values.clear()
    gauges.publish({}, routing([[0.0, 0.0]], [[0.0, 0.0]], [0]))
    assert gauges.nonstationarity.values == {}
