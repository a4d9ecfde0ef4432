"""The DiMoE-VL Grafana dashboard: build it as JSON, write it, push it to a Grafana server.

    write_dashboard("cluster/grafana/dimoe.json")
    push_dashboard("http://grafana:3000", token, build_dashboard(), folder_uid="ml")

Ray exports every `ray.util.metrics` / `ray.serve.metrics` object with a `ray_` prefix; a
Counter becomes `<name>_total` and a Histogram `<name>_bucket`, `<name>_sum`, `<name>_count`.
The names the dashboard uses are listed once, in `DASHBOARD_METRICS`; their kinds and tags are
read from the metric definitions in the `dimoe` sources (`metric_definitions`), so a renamed or
removed metric makes `build_dashboard` fail instead of leaving an empty panel.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

DASHBOARD_UID = "dimoe-vl"
DEFAULT_DASHBOARD_PATH = Path("cluster/grafana/dimoe.json")
SCHEMA_VERSION = 39
PROMETHEUS_PREFIX = "ray_"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The one list of metrics the dashboard plots (names as defined in code, without Ray's prefix).
DASHBOARD_METRICS: tuple[str, ...] = (
    # training: dimoe.train.telemetry.RoutingGauges
    "dimoe_expert_load",
    "dimoe_router_entropy",
    "dimoe_view_consistency",
    "dimoe_routing_nonstationarity",
    "dimoe_train_loss",
    # serving: dimoe.serving.metrics
    "dimoe_serve_requests",
    "dimoe_serve_errors",
    "dimoe_serve_decoder_rejected",
    "dimoe_serve_decode_latency_s",
    "dimoe_serve_queue_wait_s",
    "dimoe_serve_batch_size",
    "dimoe_serve_nfe",
    "dimoe_serve_decoder_in_flight",
)

KIND_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
METRIC_MODULES = {"ray.util.metrics": False, "ray.serve.metrics": True}  # module -> adds Serve tags
SERVE_TAGS = ("deployment", "replica", "application")
CONSTRUCTORS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}


@dataclass(frozen=True)
class MetricDefinition:
    name: str  # as passed to the constructor, e.g. "dimoe_expert_load"
    kind: str  # "counter" | "gauge" | "histogram"
    tags: tuple[str, ...]  # tag keys, with the ones Serve adds for `ray.serve.metrics`
    source: str  # file, relative to the package root

    @property
    def series(self) -> tuple[str, ...]:
        """The Prometheus series names Ray exports for this metric."""
        return tuple(PROMETHEUS_PREFIX + self.name + suffix for suffix in KIND_SUFFIXES[self.kind])


# -- metric definitions read from the sources -------------------------------------------------------
def _string_tuple(node: ast.AST | None, names: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return ()
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Tuple | ast.List) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
    return None


def _scope_tuples(scope: ast.AST) -> dict[str, tuple[str, ...]]:
    """`name = ("a", "b")` assignments directly in a function or module body."""
    found: dict[str, tuple[str, ...]] = {}
    for stmt in getattr(scope, "body", []):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _string_tuple(stmt.value, {})
            if value:
                found[stmt.targets[0].id] = value
    return found


def _definitions_in(path: Path, relative: str) -> list[MetricDefinition]:
    tree = ast.parse(path.read_text(), filename=str(path))
    constructors: dict[str, tuple[str, bool]] = {}  # local name -> (kind, serve)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in METRIC_MODULES:
            for alias in node.names:
                if alias.name in CONSTRUCTORS:
                    constructors[alias.asname or alias.name] = (
                        CONSTRUCTORS[alias.name],
                        METRIC_MODULES[node.module],
                    )
    if not constructors:
        return []
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def local_tuples(node: ast.AST) -> dict[str, tuple[str, ...]]:
        """Tuple names visible at `node`: module level, overridden by the enclosing functions."""
        scopes = [tree]
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                scopes.insert(1, node)
        return {name: value for scope in scopes for name, value in _scope_tuples(scope).items()}

    found = []
    for node in ast.walk(tree):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        if not (call and node.func.id in constructors):
            continue
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        name_node = node.args[0] if node.args else keywords.get("name")
        if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
            continue  # a computed name cannot be checked statically
        tag_node = keywords.get("tag_keys", node.args[2] if len(node.args) > 2 else None)
        tags = _string_tuple(tag_node, local_tuples(node))
        if tags is None:
            raise ValueError(
                f"{relative}:{node.lineno}: tag_keys of metric {name_node.value!r} is not a literal "
                "tuple of strings (or a name bound to one in the enclosing function or module)"
            )
        kind, serve = constructors[node.func.id]
        found.append(MetricDefinition(name_node.value, kind, (SERVE_TAGS if serve else ()) + tags, relative))
    return found


@lru_cache(maxsize=1)
def _all_definitions() -> tuple[MetricDefinition, ...]:
    import dimoe

    root = Path(dimoe.__file__).parent
    found: list[MetricDefinition] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if "metrics import" not in text:
            continue
        found.extend(_definitions_in(path, str(path.relative_to(root.parent))))
    return tuple(found)


def metric_definitions() -> dict[str, MetricDefinition]:
    """Every Ray metric the `dimoe` package defines (`Counter/Gauge/Histogram("name", …)` imported
    from `ray.util.metrics` or `ray.serve.metrics`), by name, read from the sources without
    importing them (serving modules need Ray Serve, training ones a Ray worker)."""
    definitions: dict[str, MetricDefinition] = {}
    for definition in _all_definitions():
        known = definitions.get(definition.name)
        if known is not None and (known.kind, known.tags) != (definition.kind, definition.tags):
            raise ValueError(
                f"metric {definition.name!r} is defined twice with different kinds or tags "
                f"({known.source}, {definition.source})"
            )
        definitions[definition.name] = definition
    return definitions


def _checked_definitions() -> dict[str, MetricDefinition]:
    definitions = metric_definitions()
    missing = [name for name in DASHBOARD_METRICS if name not in definitions]
    if missing:
        raise ValueError(
            f"the dashboard plots metrics the code no longer defines: {', '.join(missing)} "
            "(update DASHBOARD_METRICS in dimoe/dashboards/grafana.py)"
        )
    return {name: definitions[name] for name in DASHBOARD_METRICS}


# -- dashboard JSON -------------------------------------------------------------------------------
class _Builder:
    """Panels laid out left to right on Grafana's 24-column grid, with sequential ids."""

    def __init__(self, definitions: dict[str, MetricDefinition]) -> None:
        self.definitions = definitions
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_height = 0

    def series(self, name: str, suffix: str = "") -> str:
        """The exported series of a dashboard metric; fails for a name or suffix the code lacks."""
        if name not in self.definitions:
            raise ValueError(f"{name!r} is not in DASHBOARD_METRICS")
        definition = self.definitions[name]
        if suffix not in KIND_SUFFIXES[definition.kind]:
            raise ValueError(f"{name} is a {definition.kind}: no {suffix or 'bare'} series")
        return PROMETHEUS_PREFIX + name + suffix

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
        if self.x + width > 24:
            self._newline()
        defaults: dict[str, Any] = {
            "unit": unit,
            "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
        }
        if min_value is not None:
            defaults["min"] = min_value
        if max_value is not None:
            defaults["max"] = max_value
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": [
                    {
                        "datasource": DATASOURCE,
                        "editorMode": "code",
                        "expr": expr,
                        "legendFormat": legend,
                        "range": True,
                        "refId": chr(ord("A") + index),
                    }
                    for index, (expr, legend) in enumerate(targets)
                ],
                **(extra or {}),
            }
        )
        self.x += width
        self.row_height = max(self.row_height, height)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = self.row_height = 0


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
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
        "current": {},
        "options": [],
        "hide": 0,
    }


def _rate(series: str) -> str:
    return f"rate({series}[$__rate_interval])"


def _quantiles(b: _Builder, name: str) -> list[tuple[str, str]]:
    """p50, p95 and p99 over all replicas of a histogram."""
    rate = _rate(b.series(name, "_bucket"))
    return [
        (f"histogram_quantile({q}, sum by (le) ({rate}))", f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)
    ]


def _mean(b: _Builder, name: str, by: str | None = None) -> str:
    group = f" by ({by})" if by else ""
    total, count = _rate(b.series(name, "_sum")), _rate(b.series(name, "_count"))
    return f"sum{group} ({total}) / sum{group} ({count})"


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana JSON (schema 39): a Prometheus datasource variable, `stage` and
    `layer` variables, a training row (routing gauges, loss terms) and a serving row."""
    b = _Builder(_checked_definitions())
    selector = '{stage=~"$stage", layer=~"$layer"}'
    midpoint_note = (
        " Ray records histogram sums at bucket midpoints, so the mean is approximate; the quantiles "
        "interpolate within buckets."
    )

    b.row("Training: routing (rank 0, every log_every steps)")
    b.timeseries(
        "Routing non-stationarity",
        [(b.series("dimoe_routing_nonstationarity") + selector, "{{stage}} layer {{layer}}")],
        description="Jensen–Shannon divergence (bits, 0–1) between a layer's expert-load distribution "
        "at this log step and at the previous one: how fast routing drifts during training.",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "Router entropy",
        [(b.series("dimoe_router_entropy") + selector, "{{stage}} layer {{layer}}")],
        description="Mean entropy of the router distribution over visible tokens.",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "View consistency (top-k overlap)",
        [(b.series("dimoe_view_consistency") + selector, "{{stage}} layer {{layer}}")],
        description="Mean Jaccard overlap of a visible token's top-k experts in the two views "
        "(problem B; 1 = same experts). Absent for one-view stages.",
        unit="percentunit",
        width=12,
        min_value=0,
        max_value=1,
    )
    b.timeseries(
        "Loss terms",
        [(b.series("dimoe_train_loss") + '{stage=~"$stage"}', "{{stage}} {{term}}")],
        description="Weighted loss terms of rank 0's last micro-batch (loss, loss_diffusion, "
        "loss_bal, loss_z, loss_prior, loss_cons, loss_cap).",
        width=12,
    )
    b.timeseries(
        "Expert load · layer $layer",
        [(b.series("dimoe_expert_load") + selector, "{{stage}} expert {{expert}}")],
        description="Fraction of top-k assignments of visible tokens per expert (token-weighted over "
        "t-buckets). 1/num_experts everywhere is perfect balance.",
        unit="percentunit",
        width=24,  # the repeat gives one panel per selected layer, three per line
        min_value=0,
        extra={"repeat": "layer", "repeatDirection": "h", "maxPerRow": 3},
    )

    b.row("Serving")
    b.timeseries(
        "Request rate",
        [
            (
                f"sum by (endpoint, protocol) ({_rate(b.series('dimoe_serve_requests', '_total'))})",
                "{{endpoint}} {{protocol}}",
            )
        ],
        description="Requests received by the ingress per second.",
        unit="reqps",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "Errors",
        [
            (
                f"sum by (endpoint, kind) ({_rate(b.series('dimoe_serve_errors', '_total'))})",
                "{{endpoint}} {{kind}}",
            ),
            (
                f"sum by (kind) ({_rate(b.series('dimoe_serve_decoder_rejected', '_total'))})",
                "decoder rejected {{kind}}",
            ),
        ],
        description="Requests answered with an error per second, by kind; jobs the decoder refused "
        "or failed.",
        unit="reqps",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "Decode latency",
        _quantiles(b, "dimoe_serve_decode_latency_s"),
        description="Seconds from the start of a request's batch to its last block (all strategies).",
        unit="s",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "Queue wait",
        _quantiles(b, "dimoe_serve_queue_wait_s"),
        description="Seconds a request waited in the decoder before its batch started.",
        unit="s",
        width=12,
        min_value=0,
    )
    b.timeseries(
        "Batch size",
        [(_mean(b, "dimoe_serve_batch_size"), "mean"), *_quantiles(b, "dimoe_serve_batch_size")[:2]],
        description="Requests per batched decoder call." + midpoint_note,
        width=8,
        min_value=0,
    )
    nfe_rate = _rate(b.series("dimoe_serve_nfe", "_bucket"))
    b.timeseries(
        "NFE per request",
        [
            (_mean(b, "dimoe_serve_nfe", "strategy"), "mean {{strategy}}"),
            (
                f"histogram_quantile(0.95, sum by (le, strategy) ({nfe_rate}))",
                "p95 {{strategy}}",
            ),
        ],
        description="Forward passes (function evaluations) per request, by decoding strategy."
        + midpoint_note,
        width=8,
        min_value=0,
    )
    b.timeseries(
        "Decoder in flight",
        [(f"sum by (replica) ({b.series('dimoe_serve_decoder_in_flight')})", "{{replica}}")],
        description="Requests accepted by a decoder replica and not yet answered.",
        width=8,
        min_value=0,
    )

    stage_query = f"label_values({b.series('dimoe_expert_load')}, stage)"
    layer_query = f'label_values({b.series("dimoe_expert_load")}{{stage=~"$stage"}}, layer)'
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
        "templating": {
            "list": [
                {
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
                },
                _query_variable("stage", "Stage", stage_query),
                _query_variable("layer", "Layer", layer_query),
            ]
        },
        "panels": b.panels,
    }


def dashboard_text(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write_dashboard(path: str | Path = DEFAULT_DASHBOARD_PATH) -> Path:
    """Write `build_dashboard()` to `path` (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dashboard_text(build_dashboard()))
    return path


def load_dashboard(path: str | Path) -> dict[str, Any]:
    """A dashboard JSON file, checked to be one Grafana dashboard object with a uid."""
    path = Path(path)
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(dashboard, dict) or not dashboard.get("uid") or "panels" not in dashboard:
        raise ValueError(f"{path} is not a Grafana dashboard (an object with `uid` and `panels`)")
    return dashboard


# -- push -----------------------------------------------------------------------------------------
def _api_base(grafana_url: str) -> str:
    """`grafana-client` appends `api` to the URL path, so a sub-path needs its trailing slash."""
    parsed = urlparse(grafana_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"Grafana URL {grafana_url!r} is not an http(s) URL with a host")
    path = parsed.path.rstrip("/")
    return urlunparse(parsed._replace(path=path + "/" if path else ""))


def _reason(exc: BaseException) -> str:
    """The short cause of a transport error (`[Errno 111] Connection refused`), not the pool dump."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if errno:
        return errno.group(0).strip()
    cause = re.search(r"Caused by (\w+)", text)
    return cause.group(1) if cause else (text if len(text) < 200 else type(exc).__name__)


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
    answer (`uid`, `url`, `version`, `status`). Any failure is one ValueError naming the URL and
    the HTTP status (or that no response came)."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException, TokenAuth

    if not token:
        raise ValueError("a Grafana API token is needed (--token or GRAFANA_TOKEN)")
    if not dashboard.get("uid"):
        raise ValueError("the dashboard has no uid: Grafana could not update it in place")
    base = _api_base(grafana_url)
    api = GrafanaApi.from_url(base, credential=TokenAuth(token), timeout=timeout)
    payload: dict[str, Any] = {"dashboard": {**dashboard, "id": None}, "overwrite": overwrite}
    if folder_uid:
        payload["folderUid"] = folder_uid
    parsed = urlparse(base)  # the endpoint for messages: no credentials, no query
    where = f"{parsed.scheme}://{parsed.hostname}{f':{parsed.port}' if parsed.port else ''}{parsed.path}"
    where = where.rstrip("/") + "/api/dashboards/db"
    try:
        answer = api.dashboard.update_dashboard(payload)
    except GrafanaException as exc:
        if not exc.status_code:  # timeouts and transport errors carry status 0
            raise ValueError(
                f"pushing the dashboard to {where} failed: no HTTP response ({_reason(exc)})"
            ) from None
        detail = exc.response.get("message") if isinstance(exc.response, dict) else exc.response
        hint = " (check the token)" if exc.status_code in (401, 403) else ""
        raise ValueError(
            f"pushing the dashboard to {where} failed: HTTP {exc.status_code}{hint}: {detail or exc.message}"
        ) from None
    except OSError as exc:  # connection refused, DNS, TLS: niquests errors are OSErrors
        raise ValueError(
            f"pushing the dashboard to {where} failed: no HTTP response ({_reason(exc)})"
        ) from None
    return answer if isinstance(answer, dict) else {"response": answer}
