"""Thresholds from activation statistics.

A neuron with largest level L (its ``max_level``) covers [-L theta, L theta] per step; after T steps its
running mean takes the values k theta / T (|k| <= L T): the input x rounded to a multiple of theta / T and
clipped to +-L theta (the quantiser Q_T,L). theta = r / L for a chosen range r:
- ``mse`` (the default): r minimising E[(x - Q_T,L(x))^2] for the run's T and the neuron's alphabet, per
  row of the statistics (channel, prefix token): clipping only where it lowers the error at that T;
- ``max``: r = the largest magnitude seen;
- ``percentile``: r = the p-th percentile of the magnitudes (p in (0, 100]).

The mse search evaluates one grid of ranges, r = peak * 2^(-k/8), shared by every T and L: for a fixed
r the quantisers at 2T (or 2L) are refinements of those at T (or L), so the minimum expected error never
grows when T or L doubles.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from calibration.statistics import RunningHistogram

METHODS = ("mse", "max", "percentile")
GRID_STEPS_PER_OCTAVE = 8
GRID_OCTAVES = 8


def _errors(hist: RunningHistogram, theta: torch.Tensor, max_level: int, timesteps: int, signed: bool) -> torch.Tensor:
    """E[(x - Q(x))^2] per row (first axis of ``theta``) and candidate (second axis).

    Bin centres stand for their values (exact zeros have no error). Q maps x to k s (s = theta / T) for x in
    the cell [(k - 1/2) s, (k + 1/2) s), k = 0 .. K - 1, and everything from (K - 1/2) s up to K s = L theta
    (rounding, then clipping); with prefix sums of the counts n, n c and n c^2 each cell's error
    sum n (c - k s)^2 costs O(1), so a candidate costs O(L T) instead of O(bins)."""
    edges = hist.bin_edges()
    centres = (0.5 * (edges[1:] + edges[:-1]))
    counts = hist.magnitudes(signed)  # [rows, bins]
    used = int((counts.sum(0) > 0).nonzero().max()) + 1 if counts.any() else 1
    centres, counts = centres[:used], counts[:, :used]
    cells = max_level * timesteps
    if cells + 2 > used:  # finer cells than occupied bins: evaluate every bin directly
        return _errors_by_bin(centres, counts, theta, max_level, timesteps) / hist.count.clamp(min=1)[:, None]
    zero = torch.zeros(counts.shape[0], 1, dtype=torch.float64)
    n = torch.cat([zero, torch.cumsum(counts, -1)], -1)  # prefix sums, [rows, bins + 1]
    m1 = torch.cat([zero, torch.cumsum(counts * centres, -1)], -1)
    m2 = torch.cat([zero, torch.cumsum(counts * centres ** 2, -1)], -1)
    k = torch.arange(cells + 1, dtype=torch.float64)
    out = torch.empty(theta.shape, dtype=torch.float64)
    chunk = max(1, 2 ** 22 // (theta.shape[0] * (cells + 2)))
    for start in range(0, theta.shape[1], chunk):
        step = theta[:, start:start + chunk, None] / timesteps  # [rows, g, 1]
        bounds = (k[1:] - 0.5) * step  # lower edges of cells 1 .. K, [rows, g, K]
        idx = torch.searchsorted(centres, bounds.reshape(-1)).reshape(bounds.shape)
        first = torch.zeros_like(idx[..., :1])
        last = torch.full_like(idx[..., :1], centres.numel())
        idx = torch.cat([first, idx, last], -1)  # [rows, g, K + 2]: cell k holds bins idx[k] .. idx[k+1]
        rows = torch.arange(theta.shape[0])[:, None, None]

        def cell_sums(prefix):
            at = prefix[rows, idx]
            return at[..., 1:] - at[..., :-1]  # [rows, g, K + 1]

        q = k * step  # the value each cell is mapped to
        out[:, start:start + chunk] = (cell_sums(m2) - 2 * q * cell_sums(m1) + q ** 2 * cell_sums(n)).sum(-1)
    return out.clamp(min=0) / hist.count.clamp(min=1)[:, None]


def _errors_by_bin(centres, counts, theta, max_level, timesteps) -> torch.Tensor:
    """sum n (c - Q(c))^2 per row and candidate, one bin at a time (for quantisers finer than the histogram)."""
    out = torch.empty(theta.shape, dtype=torch.float64)
    chunk = max(1, 2 ** 22 // (theta.shape[0] * centres.numel()))
    for start in range(0, theta.shape[1], chunk):
        th = theta[:, start:start + chunk, None]
        step = th / timesteps
        q = torch.minimum(torch.round(centres / step) * step, th * max_level)
        out[:, start:start + chunk] = (counts[:, None, :] * (centres - q) ** 2).sum(-1)
    return out


def expected_error(hist: RunningHistogram, theta: Union[np.ndarray, torch.Tensor], max_level: int, timesteps: int,
                   signed: bool) -> np.ndarray:
    """E[(x - Q_T,L(x))^2] per row of ``hist`` for the thresholds ``theta`` (one per row)."""
    theta = torch.as_tensor(np.asarray(theta, dtype=np.float64)).reshape(-1, 1).expand(hist.pos.shape[0], 1)
    return _errors(hist, theta.clone(), max_level, timesteps, signed)[:, 0].numpy()


def range_grid(peak: torch.Tensor) -> torch.Tensor:
    """Candidate ranges per row: peak * 2^(-k/8), k = 0 .. 63 (8 octaves below the largest value seen)."""
    k = torch.arange(GRID_STEPS_PER_OCTAVE * GRID_OCTAVES, dtype=torch.float64)
    return peak[:, None] * torch.exp2(-k / GRID_STEPS_PER_OCTAVE)[None, :]


def mse_ranges(hist: RunningHistogram, max_level: int, timesteps: int, signed: bool) -> torch.Tensor:
    """Per row, the range r of the grid with the smallest expected error of Q_T,L (ties: the larger range)."""
    peak = hist.maximum(signed)
    grid = range_grid(peak.clamp(min=1e-30))
    errors = _errors(hist, grid / max_level, max_level, timesteps, signed)
    best = torch.argmin(errors, dim=1)  # first minimum = the largest range among equals
    return torch.where(peak > 0, grid.gather(1, best[:, None])[:, 0], torch.zeros_like(peak))


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
        r = mse_ranges(hist, max_level, timesteps, signed)
    theta = r.to(torch.float32) / max_level
    theta = torch.where(theta > 0, theta, torch.ones_like(theta))  # a neuron that never saw input: any theta works
    return theta.reshape(()) if hist.channels is None else theta
