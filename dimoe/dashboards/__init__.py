"""Grafana dashboard for the Ray metrics of training (`dimoe_*`) and serving (`dimoe_serve_*`)."""

from dimoe.dashboards.grafana import (
    DASHBOARD_METRICS,
    DASHBOARD_UID,
    build_dashboard,
    metric_definitions,
    push_dashboard,
    write_dashboard,
)

__all__ = [
    "DASHBOARD_METRICS",
    "DASHBOARD_UID",
    "build_dashboard",
    "metric_definitions",
    "push_dashboard",
    "write_dashboard",
]
