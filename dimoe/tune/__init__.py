"""Ablation grids on Ray Tune (`dimoe tune run`)."""

from dimoe.tune.ablations import run_grid

__all__ = ["run_grid"]
