"""Grafana dashboard for the Ray metrics of training (`dimoe_*`) and serving (`dimoe_serve_*`)."""

from dimoe.dashboards.grafana import (
    DASHBOARD_UID,
    DashboardError,
    build_dashboard,
    load_dashboard,
    push_dashboard,
    write_dashboard,
)

__all__ = [
    "DASHBOARD_UID",
    "DashboardError",
    "build_dashboard",
    "load_dashboard",
    "push_dashboard",
    "write_dashboard",
]
