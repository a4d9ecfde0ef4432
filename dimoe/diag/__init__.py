"""Diagnostics of problems A–F (docs/design.md §4) from training logs and data manifests: JSON + PNG."""

from dimoe.diag.gradient import diag_gradient
from dimoe.diag.ppots import diag_ppots
from dimoe.diag.routing import diag_routing
from dimoe.diag.supervision import diag_supervision

__all__ = ["diag_gradient", "diag_ppots", "diag_routing", "diag_supervision"]
