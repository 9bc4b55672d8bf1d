"""Thresholds from activation statistics.

A neuron with largest level L (its ``max_level``) covers [-L theta, L theta]
per step, so theta = r / L for a chosen range r:
- ``max``: r = the largest magnitude seen;
- ``percentile``: r = the p-th percentile of the magnitudes (p in (0, 100]);
- ``mse``: r minimising E[(x - Q_T(x))^2], with Q_T the clipped mean of T steps,
  i.e. x rounded to a multiple of theta / T and clipped to +-L theta.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from calibration.statistics import RunningHistogram

METHODS = ("max", "percentile", "mse")


def expected_error(hist: RunningHistogram, theta: np.ndarray, max_level: int, timesteps: int, signed: bool) -> np.ndarray:
    """E[(x - Q_T(x))^2] per row of ``hist`` for thresholds ``theta`` (bin centres stand for their values)."""
    edges = hist.bin_edges().numpy()
    centres = 0.5 * (edges[1:] + edges[:-1])
    counts = hist.magnitudes(signed).numpy()
    total = hist.count.numpy()
    step = np.asarray(theta, dtype=np.float64)[..., None] / timesteps
    top = np.asarray(theta, dtype=np.float64)[..., None] * max_level
    q = np.minimum(np.round(centres / step) * step, top)
    err = (counts * (centres - q) ** 2).sum(-1)
    return err / np.maximum(total, 1)


def choose_thresholds(hist: RunningHistogram, method: str, max_level: int, signed: bool,
                      percentile: float = 99.99, timesteps: int = 16) -> torch.Tensor:
    """One threshold per row of ``hist`` (a scalar tensor for per-layer statistics)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    if method == "max":
        r = hist.maximum(signed)
    elif method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        r = hist.quantile(percentile / 100.0, signed)
    else:
        peak = hist.maximum(signed).numpy()
        r = torch.tensor([_mse_range(hist, row, float(p), max_level, timesteps, signed) for row, p in enumerate(peak)])
    theta = r.to(torch.float32) / max_level
    theta = torch.where(theta > 0, theta, torch.ones_like(theta))  # a neuron that never saw input: any theta works
    return theta.reshape(()) if hist.channels is None else theta


def _mse_range(hist: RunningHistogram, row: int, peak: float, max_level: int, timesteps: int, signed: bool) -> float:
    if peak <= 0:
        return 0.0
    one = RunningHistogram(hist.bins)
    one.range = hist.range
    one.pos, one.neg, one.zeros = hist.pos[row:row + 1], hist.neg[row:row + 1], hist.zeros[row:row + 1]

    def objective(r: float) -> float:
        return float(expected_error(one, np.array([r / max_level]), max_level, timesteps, signed)[0])

    grid = np.linspace(peak / 100, peak, 100)
    best = int(np.argmin([objective(r) for r in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": peak * 1e-4})
    return float(res.x) if res.fun <= objective(grid[best]) else float(grid[best])
