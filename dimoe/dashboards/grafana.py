"""The DiMoE-VL Grafana dashboard: build it as JSON, write it, push it to a Grafana server.

    write_dashboard("cluster/grafana/dimoe.json")
    push_dashboard("http://grafana:3000", token, build_dashboard(), folder_uid="ml")

Every query is built from an entry of the metrics catalogue (`dimoe.telemetry.catalogue`): the
series names Ray exports (`ray_` prefix, `_total` for counters, `_bucket`/`_sum`/`_count` for
histograms) come from the entry, so a panel cannot ask for a series or a suffix no metric exports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from dimoe.errors import UserError
from dimoe.io import read_json, write_json
from dimoe.telemetry import catalogue
from dimoe.telemetry.catalogue import KIND_SUFFIXES, METRICS, Metric

DASHBOARD_UID = "dimoe-vl"
DEFAULT_DASHBOARD_PATH = Path("cluster/grafana/dimoe.json")
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every series is filtered by the `cluster` variable: `ray_io_cluster` is the label KubeRay's pods
# carry (cluster/prometheus/podmonitor.yaml copies it onto the series; prometheus.yml sets it
# outside Kubernetes), so concurrent clusters, e.g. one per RayJob, never merge. Series without
# the label still match "All" (`.*` matches the empty value).
CLUSTER_MATCHER = 'ray_io_cluster=~"$cluster"'
# Training gauges are also filtered by the dashboard's `stage` and `layer` variables.
STAGE_MATCHER = 'stage=~"$stage"'
LAYER_MATCHER = f'{STAGE_MATCHER}, layer=~"$layer"'
MIDPOINT_NOTE = (
    " Ray records histogram sums at bucket midpoints, so the mean is approximate; the quantiles "
    "interpolate within buckets."
)


class DashboardError(UserError):
    """A dashboard file that is not one, or a push Grafana refused or never answered."""


# -- layout ---------------------------------------------------------------------------------------
class _Builder:
    """Panels laid out left to right on Grafana's 24-column grid, with sequential ids."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def timeseries(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        description: str,
        unit: str = "none",
        width: int = 12,
        height: int = 8,
        min_value: float | None = None,
        max_value: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A time-series panel of `targets` (PromQL expression, legend) at the next free place."""
        if self.x + width > 24:
            self._newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": _field_defaults(unit, min_value, max_value), "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": [_target(expr, legend, index) for index, (expr, legend) in enumerate(targets)],
                **(extra or {}),
            }
        )
        self.x += width
        self.row_height = max(self.row_height, height)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = self.row_height = 0


def _field_defaults(unit: str, min_value: float | None, max_value: float | None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return defaults


def _target(expr: str, legend: str, index: int) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": chr(ord("A") + index),
    }


# -- PromQL from catalogue entries ----------------------------------------------------------------
def _series(metric: Metric, suffix: str = "", matchers: str = "") -> str:
    """The exported series of a catalogue metric, selected by the `cluster` variable and
    `matchers`; fails for a metric outside the catalogue or a suffix its kind does not export."""
    if METRICS.get(metric.name) is not metric:
        raise ValueError(f"{metric.name!r} is not in the metrics catalogue (dimoe/telemetry/catalogue.py)")
    if suffix not in KIND_SUFFIXES[metric.kind]:
        raise ValueError(f"{metric.name} is a {metric.kind}: no {suffix or 'bare'} series")
    selector = ", ".join(filter(None, (CLUSTER_MATCHER, matchers)))
    return catalogue.PROMETHEUS_PREFIX + metric.name + suffix + "{" + selector + "}"


def _rate(series: str) -> str:
    return f"rate({series}[$__rate_interval])"


def _summed_rate(metric: Metric, by: str) -> str:
    """Per-second rate of a counter, summed over replicas within each `by` group."""
    return f"sum by ({by}) ({_rate(_series(metric, '_total'))})"


def _quantile(metric: Metric, q: float, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({_rate(_series(metric, '_bucket'))}))"


def _quantiles(metric: Metric) -> list[tuple[str, str]]:
    """p50, p95 and p99 over all replicas of a histogram."""
    return [(_quantile(metric, q), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)]


def _mean(metric: Metric, by: str | None = None) -> str:
    group = f" by ({by})" if by else ""
    total, count = _rate(_series(metric, "_sum")), _rate(_series(metric, "_count"))
    return f"sum{group} ({total}) / sum{group} ({count})"


# -- panels ---------------------------------------------------------------------------------------
def _routing_panels(b: _Builder) -> None:
    """Training row: the routing gauges and loss terms rank 0 sets every `log_every` steps."""
    by_layer = "{{stage}} layer {{layer}}"
    b.row("Training: routing (rank 0, every log_every steps)")
    b.timeseries(
        "Routing non-stationarity",
        [(_series(catalogue.ROUTING_NONSTATIONARITY, matchers=LAYER_MATCHER), by_layer)],
        description="Mean Jensen–Shannon divergence (bits, 0–1) of each t-bucket's expert-load "
        "distribution from the layer's all-bucket mean (problem A): how much routing depends on t.",
        min_value=0,
    )
    b.timeseries(
        "Router entropy",
        [(_series(catalogue.ROUTER_ENTROPY, matchers=LAYER_MATCHER), by_layer)],
        description="Mean entropy (nats) of the router distribution over visible tokens.",
        min_value=0,
    )
    b.timeseries(
        "View consistency (top-k overlap)",
        [(_series(catalogue.VIEW_CONSISTENCY, matchers=LAYER_MATCHER), by_layer)],
        description="Mean Jaccard overlap of a visible token's top-k experts in the two views "
        "(problem B; 1 = same experts). Absent for one-view stages.",
        unit="percentunit",
        min_value=0,
        max_value=1,
    )
    b.timeseries(
        "Loss terms",
        [(_series(catalogue.TRAIN_LOSS, matchers=STAGE_MATCHER), "{{stage}} {{term}}")],
        description="Weighted loss terms of rank 0's last micro-batch (loss, loss_diffusion, "
        "loss_bal, loss_z, loss_prior, loss_cons, loss_cap).",
    )
    b.timeseries(
        "Expert load · layer $layer",
        [(_series(catalogue.EXPERT_LOAD, matchers=LAYER_MATCHER), "{{stage}} expert {{expert}}")],
        description="Fraction of top-k assignments of visible tokens per expert (token-weighted over "
        "t-buckets). 1/num_experts everywhere is perfect balance.",
        unit="percentunit",
        width=24,  # the repeat gives one panel per selected layer, three per line
        min_value=0,
        extra={"repeat": "layer", "repeatDirection": "h", "maxPerRow": 3},
    )


def _traffic_panels(b: _Builder) -> None:
    """Serving row, first line: what the ingress receives and what fails."""
    b.row("Serving")
    b.timeseries(
        "Request rate",
        [(_summed_rate(catalogue.SERVE_REQUESTS, "endpoint, protocol"), "{{endpoint}} {{protocol}}")],
        description="Requests received by the ingress per second.",
        unit="reqps",
        min_value=0,
    )
    b.timeseries(
        "Errors",
        [
            (_summed_rate(catalogue.SERVE_ERRORS, "endpoint, kind"), "{{endpoint}} {{kind}}"),
            (_summed_rate(catalogue.DECODER_REJECTED, "kind"), "decoder rejected {{kind}}"),
        ],
        description="Requests answered with an error per second, by kind; jobs the decoder refused "
        "or failed.",
        unit="reqps",
        min_value=0,
    )


def _decoder_panels(b: _Builder) -> None:
    """Serving row, next lines: the decoder's latency, batching and load."""
    b.timeseries(
        "Decode latency",
        _quantiles(catalogue.DECODE_LATENCY),
        description="Seconds from the start of a request's batch to its last block (all strategies).",
        unit="s",
        min_value=0,
    )
    b.timeseries(
        "Queue wait",
        _quantiles(catalogue.QUEUE_WAIT),
        description="Seconds a request waited in the decoder before its batch started.",
        unit="s",
        min_value=0,
    )
    b.timeseries(
        "Batch size",
        [(_mean(catalogue.BATCH_SIZE), "mean"), *_quantiles(catalogue.BATCH_SIZE)[:2]],
        description="Requests per batched decoder call." + MIDPOINT_NOTE,
        width=8,
        min_value=0,
    )
    b.timeseries(
        "NFE per request",
        [
            (_mean(catalogue.NFE, "strategy"), "mean {{strategy}}"),
            (_quantile(catalogue.NFE, 0.95, by="le, strategy"), "p95 {{strategy}}"),
        ],
        description="Forward passes (function evaluations) per request, by decoding strategy."
        + MIDPOINT_NOTE,
        width=8,
        min_value=0,
    )
    b.timeseries(
        "Decoder in flight",
        [(f"sum by (replica) ({_series(catalogue.DECODER_IN_FLIGHT)})", "{{replica}}")],
        description="Requests accepted by a decoder replica and not yet answered.",
        width=8,
        min_value=0,
    )


# -- variables and the dashboard ------------------------------------------------------------------
def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value variable from a label's values; "All" (the default) matches every series,
    those without the label included."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,  # on time-range change: stages and layers appear as runs start
        "regex": "",
        "sort": 3,  # numerical ascending (layers 0, 1, …, 10)
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def _variables() -> list[dict[str, Any]]:
    """The Prometheus datasource, the clusters any series reports, then the stages and layers the
    expert-load gauge has reported in the selected clusters."""
    load, staged_load = _series(catalogue.EXPERT_LOAD), _series(catalogue.EXPERT_LOAD, matchers=STAGE_MATCHER)
    datasource = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "regex": "",
        "current": {},
        "options": [],
        "hide": 0,
        "multi": False,
        "includeAll": False,
    }
    return [
        datasource,
        _query_variable("cluster", "Ray cluster", "label_values(ray_io_cluster)"),
        _query_variable("stage", "Stage", f"label_values({load}, stage)"),
        _query_variable("layer", "Layer", f"label_values({staged_load}, layer)"),
    ]


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana JSON (schema 39): a Prometheus datasource variable, `cluster`,
    `stage` and `layer` variables, a training row (routing gauges, loss terms) and a serving row."""
    b = _Builder()
    _routing_panels(b)
    _traffic_panels(b)
    _decoder_panels(b)
    return {
        "id": None,
        "uid": DASHBOARD_UID,
        "title": "DiMoE-VL: routing and serving",
        "description": "Ray metrics of DiMoE-VL training (routing gauges, loss terms) and serving "
        "(requests, latency, batching, NFE). Built by `dimoe tools grafana-dashboard`.",
        "tags": ["dimoe", "ray"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": _variables()},
        "panels": b.panels,
    }


def write_dashboard(path: str | Path = DEFAULT_DASHBOARD_PATH) -> Path:
    """Write `build_dashboard()` to `path` (creating folders); returns the path."""
    return write_json(path, build_dashboard())


def load_dashboard(path: str | Path) -> dict[str, Any]:
    """A dashboard JSON file, checked to be one Grafana dashboard object with a uid."""
    dashboard = read_json(path)  # bad JSON: a JsonFileError naming the file and line
    if not isinstance(dashboard, dict) or not dashboard.get("uid") or "panels" not in dashboard:
        raise DashboardError(f"{path} is not a Grafana dashboard (an object with `uid` and `panels`)")
    return dashboard


# -- push -----------------------------------------------------------------------------------------
def _api_base(grafana_url: str) -> str:
    """`grafana-client` appends `api` to the URL path, so a sub-path needs its trailing slash."""
    parsed = urlparse(grafana_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DashboardError(f"Grafana URL {grafana_url!r} is not an http(s) URL with a host")
    path = parsed.path.rstrip("/")
    return urlunparse(parsed._replace(path=path + "/" if path else ""))


def _endpoint(base: str) -> str:
    """The push endpoint for messages: without credentials or query, which may hold secrets."""
    parsed = urlparse(base)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.hostname}{port}{parsed.path}".rstrip("/") + "/api/dashboards/db"


def _reason(exc: BaseException) -> str:
    """The short cause of a transport error (`[Errno 111] Connection refused`), not the pool dump."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if errno:
        return errno.group(0).strip()
    cause = re.search(r"Caused by (\w+)", text)
    return cause.group(1) if cause else (text if len(text) < 200 else type(exc).__name__)


def _refused(where: str, status: int, detail: object) -> DashboardError:
    hint = " (check the token)" if status in (401, 403) else ""
    return DashboardError(f"pushing the dashboard to {where} failed: HTTP {status}{hint}: {detail}")


def _unanswered(where: str, exc: BaseException) -> DashboardError:
    return DashboardError(f"pushing the dashboard to {where} failed: no HTTP response ({_reason(exc)})")


def push_dashboard(
    grafana_url: str,
    token: str,
    dashboard: dict[str, Any],
    folder_uid: str | None = None,
    overwrite: bool = True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Create or replace `dashboard` (matched by uid) on a Grafana server: POST /api/dashboards/db
    with a Bearer token (a service-account token with dashboard write rights). Returns Grafana's
    answer (`uid`, `url`, `version`, `status`). Any failure is one DashboardError naming the URL
    and the HTTP status (or that no response came)."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException, TokenAuth

    if not token:
        raise DashboardError("a Grafana API token is needed (--token or GRAFANA_TOKEN)")
    if not dashboard.get("uid"):
        raise DashboardError("the dashboard has no uid: Grafana could not update it in place")
    base = _api_base(grafana_url)
    api = GrafanaApi.from_url(base, credential=TokenAuth(token), timeout=timeout)
    payload: dict[str, Any] = {"dashboard": {**dashboard, "id": None}, "overwrite": overwrite}
    if folder_uid:
        payload["folderUid"] = folder_uid
    where = _endpoint(base)
    try:
        answer = api.dashboard.update_dashboard(payload)
    except GrafanaException as exc:
        if not exc.status_code:  # timeouts and transport errors carry status 0
            raise _unanswered(where, exc) from None
        detail = exc.response.get("message") if isinstance(exc.response, dict) else exc.response
        raise _refused(where, exc.status_code, detail or exc.message) from None
    except OSError as exc:  # connection refused, DNS, TLS: niquests errors are OSErrors
        raise _unanswered(where, exc) from None
    return answer if isinstance(answer, dict) else {"response": answer}
