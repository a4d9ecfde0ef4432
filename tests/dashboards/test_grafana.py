"""The Grafana dashboard: its JSON, its PromQL against the metrics catalogue, the committed file, and
the push to a real (local, recording) HTTP server standing in for Grafana."""

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.dashboards.grafana import DASHBOARD_UID, build_dashboard, push_dashboard, write_dashboard
from dimoe.telemetry.catalogue import KIND_SUFFIXES, METRICS

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "cluster" / "grafana" / "dimoe.json"
# Labels Ray puts on every exported series, the histogram bucket bound, and the cluster label the
# scrape configs of cluster/prometheus/ add.
RAY_LABELS = {
    "Component",
    "NodeAddress",
    "SessionName",
    "Version",
    "WorkerId",
    "JobId",
    "le",
    "ray_io_cluster",
}
CLUSTER_MATCHER = 'ray_io_cluster=~"$cluster"'

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


# -- PromQL parsing (deliberately independent of the builder) ---------------------------------------
def promql_references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names in its selectors}, label names in by/without clauses)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors [5m] / [$__rate_interval]
    grouping: set[str] = set()
    clause = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for match in re.finditer(clause, text):
        grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    text = re.sub(clause, " ", text)  # `sum by (le) (x)` -> `sum  (x)`: sum is then a call
    metrics: dict[str, set[str]] = {}
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", text):
        labels = {
            m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2))
        }
        metrics.setdefault(match.group(1), set()).update(labels)
    bare = re.sub(r"\{[^}]*\}", "", text)
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", bare):
        name, call = match.group(1), match.group(2)
        if call or name in PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        metrics.setdefault(name, set())
    return metrics, grouping


def test_promql_parser_finds_names_and_labels():
    metrics, grouping = promql_references(
        'histogram_quantile(0.9, sum by (le, strategy) (rate(ray_x_bucket{a=~"$b", c!="d{e}"}[5m]))) '
        "/ ignoring(c) ray_y_total + on() vector(1) + 2.5"
    )
    assert metrics == {"ray_x_bucket": {"a", "c"}, "ray_y_total": set()}
    assert grouping == {"le", "strategy", "c"}


def all_queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            if variable["name"] == "cluster":  # the values of a label over all series: no metric
                assert query == "label_values(ray_io_cluster)"
                continue
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert inner, query
            exprs.append(inner.group(1))
    return exprs


def resolve(series: str) -> tuple[str, str]:
    """`ray_dimoe_serve_nfe_bucket` -> (`dimoe_serve_nfe`, `_bucket`), checked against the catalogue."""
    assert series.startswith("ray_"), f"{series}: Ray exports every metric with the ray_ prefix"
    name = series.removeprefix("ray_")
    for suffix in ("_total", "_bucket", "_sum", "_count", ""):
        base = name.removesuffix(suffix) if suffix else name
        if (suffix == "" or name.endswith(suffix)) and base in METRICS:
            kind = METRICS[base].kind
            assert suffix in KIND_SUFFIXES[kind], f"{series}: wrong suffix for a {kind}"
            return base, suffix
    raise AssertionError(f"{series} is not exported by any metric of the catalogue")


# -- the dashboard JSON -----------------------------------------------------------------------------
def test_dashboard_is_well_formed():
    dashboard = build_dashboard()
    assert dashboard["uid"] == DASHBOARD_UID == "dimoe-vl"
    assert dashboard["id"] is None and 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "stage", "layer"]  # the order Grafana shows
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("cluster", "stage", "layer"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["multi"] and variables[name]["includeAll"]
        # "All" by default, as `.*`: it also matches series without the label (no relabeling).
        assert variables[name]["allValue"] == ".*" and variables[name]["current"]["value"] == ["$__all"]

    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values())
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("expert load", "entropy", "consistency", "non-stationarity", "loss", "request rate",
                  "errors", "latency", "batch size", "nfe", "in flight"):  # fmt: skip
        assert topic in titles, topic
    latency = next(p for p in panels if p["title"] == "Decode latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]
    assert all("histogram_quantile" in t["expr"] and "_bucket{" in t["expr"] for t in latency["targets"])
    assert json.loads(json.dumps(dashboard)) == dashboard  # plain JSON, no tuples or paths


def test_every_query_uses_only_catalogue_metrics_and_labels():
    used: set[str] = set()
    for expr in all_queries(build_dashboard()):
        metrics, grouping = promql_references(expr)
        assert metrics, f"no metric in {expr!r}"
        allowed = set(RAY_LABELS)
        for series, labels in metrics.items():
            base, _ = resolve(series)
            used.add(base)
            tags = set(METRICS[base].tags)
            assert labels <= tags | RAY_LABELS, f"{expr!r}: {series} has no label {labels - tags}"
            allowed |= tags
        assert grouping <= allowed, f"{expr!r}: grouping by unknown labels {grouping - allowed}"
    # Every catalogue metric has a panel: a new metric without one fails here.
    assert used == set(METRICS)


def test_every_series_of_every_panel_is_filtered_by_the_cluster_variable():
    """Concurrent clusters (one per RayJob) must not merge: each selector of each panel query, and
    of the stage and layer variables, matches `ray_io_cluster` against `$cluster`."""
    dashboard = build_dashboard()
    for expr in all_queries(dashboard):
        metrics, _ = promql_references(expr)
        for series, labels in metrics.items():
            assert "ray_io_cluster" in labels, f"{series} in {expr!r} is not filtered by cluster"
        assert expr.count(CLUSTER_MATCHER) == len(re.findall(r"\bray_\w+\{", expr)), expr


def test_committed_dashboard_is_the_built_one(tmp_path):
    assert COMMITTED.is_file(), "run `dimoe tools grafana-dashboard` to write cluster/grafana/dimoe.json"
    assert json.loads(COMMITTED.read_text()) == build_dashboard()
    assert COMMITTED.read_text() == write_dashboard(tmp_path / "dimoe.json").read_text()


def test_cli_writes_the_dashboard(tmp_path):
    out = tmp_path / "grafana" / "dimoe.json"
    result = CliRunner().invoke(app, ["tools", "grafana-dashboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dashboard"] == str(out)
    assert json.loads(out.read_text()) == build_dashboard()


# -- push to a real HTTP server ---------------------------------------------------------------------
class FakeGrafana:
    """A local HTTP server that records every request and answers with a configurable status."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status, self.answer = 200, {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append(
                    {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
                )
                payload = json.dumps(fake.answer).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def grafana():
    server = FakeGrafana()
    server.answer = {
        "id": 7,
        "uid": DASHBOARD_UID,
        "url": "/d/dimoe-vl/dimoe-vl",
        "status": "success",
        "version": 1,
    }
    yield server
    server.close()


def only_request(server: FakeGrafana) -> tuple[dict, dict]:
    assert len(server.requests) == 1
    request = server.requests[0]
    return request, json.loads(request["body"])


def test_push_posts_the_dashboard_with_a_bearer_token(grafana):
    answer = push_dashboard(grafana.url, "s3cret-token", build_dashboard(), folder_uid="ml-folder")
    assert answer["uid"] == DASHBOARD_UID and answer["status"] == "success"
    request, body = only_request(grafana)
    assert request["method"] == "POST" and request["path"] == "/api/dashboards/db"
    assert request["headers"]["Authorization"] == "Bearer s3cret-token"
    assert request["headers"]["Content-Type"].startswith("application/json")
    assert body["dashboard"]["uid"] == "dimoe-vl" and body["dashboard"]["id"] is None
    assert body["overwrite"] is True and body["folderUid"] == "ml-folder"
    assert body["dashboard"]["panels"] == build_dashboard()["panels"]


def test_push_under_a_sub_path_and_without_folder(grafana):
    push_dashboard(grafana.url + "/grafana/", "t", build_dashboard(), overwrite=False)
    request, body = only_request(grafana)
    assert request["path"] == "/grafana/api/dashboards/db"
    assert body["overwrite"] is False and "folderUid" not in body


def test_push_refused_token_is_one_clear_error(grafana):
    grafana.status, grafana.answer = 401, {"message": "invalid API key"}
    with pytest.raises(ValueError, match=r"http://127\.0\.0\.1:\d+/api/dashboards/db.*HTTP 401") as info:
        push_dashboard(grafana.url, "bad-token", build_dashboard())
    assert "invalid API key" in str(info.value) and "bad-token" not in str(info.value)


def test_push_unreachable_grafana_is_one_clear_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ValueError, match=rf"127\.0\.0\.1:{port}/api/dashboards/db.*no HTTP response"):
        push_dashboard(f"http://127.0.0.1:{port}", "t", build_dashboard(), timeout=5)
    with pytest.raises(ValueError, match="not an http"):
        push_dashboard("grafana:3000", "t", build_dashboard())


def test_cli_push_reads_the_token_from_the_environment(grafana, tmp_path):
    runner = CliRunner()
    args = ["tools", "push-dashboard", "--grafana-url", grafana.url, "--dashboard", str(COMMITTED)]
    result = runner.invoke(app, args, env={"GRAFANA_TOKEN": "env-token"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["uid"] == DASHBOARD_UID
    request, body = only_request(grafana)
    assert request["headers"]["Authorization"] == "Bearer env-token"
    assert body["dashboard"]["uid"] == DASHBOARD_UID and body["overwrite"] is True

    grafana.status, grafana.answer = 401, {"message": "Unauthorized"}
    result = runner.invoke(app, [*args, "--token", "wrong"], env={"GRAFANA_TOKEN": "env-token"})
    assert result.exit_code == 2
    assert "HTTP 401" in result.stderr and grafana.url in result.stderr.replace("\n", "")
    assert grafana.requests[-1]["headers"]["Authorization"] == "Bearer wrong"

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = runner.invoke(app, [*args[:-1], str(broken), "--token", "t"])
    # The CLI's console wraps long lines at its width: compare the message unwrapped.
    assert result.exit_code == 2 and "not valid JSON" in result.stderr.replace("\n", "")
