"""The run folder's figures: accuracy vs t (sweep.png) and energy vs accuracy (energy.png)."""
from __future__ import annotations

import io
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sweep_figure(rows: List[Dict], ann_top1: float, title: str = ""):
    """Top-1 vs t, one line per variant, the ANN as a dashed line, log-2 t axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["t"], r["top1"]) for r in rows if r["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", markersize=3, label=variant)
    ax.axhline(ann_top1, linestyle="--", color="black", label=f"ANN {ann_top1:.2f}%")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, "timestep t", title)


def energy_figure(points: List[Dict], ann_top1: float, ann_energy_uj: float, title: str = ""):
    """Energy per image (uJ) vs top-1, one line per variant across t; the ANN as one marker."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(p["variant"] for p in points):
        pts = [(p["energy_uj"], p["top1"]) for p in points if p["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", markersize=3, label=variant)
    ax.plot([ann_energy_uj], [ann_top1], marker="*", markersize=12, linestyle="none", color="black", label="ANN")
    ax.set_xscale("log")
    return _finish(fig, ax, "energy per image (uJ, 4.6 pJ/MAC + 0.9 pJ/SOP)", title)


def _finish(fig, ax, xlabel: str, title: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def png_bytes(fig, dpi: int = 120) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
