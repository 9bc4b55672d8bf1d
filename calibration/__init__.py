"""Calibration: statistics of every neuron's input on calibration images, then thresholds."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from calibration.statistics import RunningHistogram, analog_mode, collect_statistics, iter_images
from calibration.thresholds import METHODS, choose_thresholds, expected_error
from models.neurons import BaseNeuron

__all__ = ["calibrate", "collect_statistics", "choose_thresholds", "expected_error", "iter_images",
           "analog_mode", "RunningHistogram", "METHODS"]


def calibrate(net: nn.Module, data: Iterable, method: str = "percentile", percentile: float = 99.99,
              timesteps: int = 16, num_images: Optional[int] = None, per_channel: bool = False,
              progress: bool = True) -> Dict[str, dict]:
    """Set the threshold of every neuron in ``net`` from statistics on ``data``; returns a per-layer report."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hists = collect_statistics(net, data, num_images=num_images, per_channel=per_channel, progress=progress)
    report = {}
    for name, module in net.named_modules():
        if not isinstance(module, BaseNeuron):
            continue
        if name not in hists:
            raise ValueError(f"neuron {name} saw no input during calibration: is it on the model's forward path?")
        hist = hists[name]
        theta = choose_thresholds(hist, method, module.max_level, module.signed, percentile, timesteps)
        module.threshold = nn.Parameter(theta.to(module.threshold.device), requires_grad=False)
        peak = hist.maximum(module.signed)
        report[name] = {
            "threshold": theta.tolist(),
            "max_input": peak.tolist() if per_channel else float(peak[0]),
            "expected_error": float(expected_error(hist, theta.reshape(-1).numpy(), module.max_level, timesteps,
                                                   module.signed).mean()),
        }
    return report
