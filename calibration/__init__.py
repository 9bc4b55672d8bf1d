"""Calibration: statistics of every neuron's input on calibration images, thresholds, corrections."""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from calibration.corrections import bias_correction, constant_norms, firing_rates, output_affine
from calibration.offsets import input_offsets
from calibration.statistics import RunningHistogram, analog_mode, collect_statistics, iter_images
from calibration.thresholds import METHODS, choose_thresholds, expected_error
from models.distributed import shard, world_size
from models.neurons import BaseNeuron

__all__ = ["calibrate", "collect_statistics", "choose_thresholds", "expected_error", "iter_images",
           "analog_mode", "bias_correction", "firing_rates", "RunningHistogram", "METHODS", "CORRECTIONS"]

CORRECTIONS = ("none", "bias")
# The report's firing rates simulate T steps: on this many images (each layer's rate is still a mean over
# hundreds of thousands of neuron-steps) instead of a whole batch, which took a fifth to a quarter of a
# conversion at T=64 (vit_fmnist 7.5 -> 6.0 s, vit_fmnist_p4 18.4 -> 13.4 s on 2 CPU cores)
FIRING_RATE_IMAGES = 16


def calibrate(net: nn.Module, data: Iterable, method: str = "mse", percentile: float = 99.99,
              timesteps: int = 16, num_images: Optional[int] = None, per_channel: bool = False,
              correction: str = "none", offsets: bool = True, step_mode: str = "s", progress: bool = True,
              prefix_tokens: int = 0, tokens: Optional[int] = None) -> Dict[str, dict]:
    """Set every neuron's threshold in ``net`` from statistics on ``data``, then apply ``correction``.

    ``prefix_tokens`` P (class, register, distillation tokens) and ``tokens`` (the model's token count): a
    neuron whose input runs along the token axis gets thresholds of shape [P + 1, ...], one row per prefix
    token and one for the other tokens (prefix tokens carry activations far above the patches'); a prefix
    row is never below the other tokens' row.
    With ``offsets``, an unsigned neuron in front of a Linear layer whose input goes negative gets an input
    offset first (calibration.offsets). Returns a per-layer report: threshold, clipped share, expected error,
    firing rate on the first FIRING_RATE_IMAGES calibration images, the input offset, and the bias shift of
    the correction."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}: use one of {', '.join(CORRECTIONS)}")
    batches = list(_take(iter_images(data), num_images))
    seen = sum(len(b) for b in batches)
    if num_images is not None and 0 < seen < num_images:
        warnings.warn(f"only {seen} calibration images available (asked for {num_images}); calibrating on {seen}",
                      stacklevel=3)
    mine = _rank_shard(batches)
    # offsets first (on the ANN's activations: norms not yet fitted compute the norm they replace), then the
    # constant norms (fitted to their input with the offsets in place), then the thresholds (for x + o)
    offset_report = input_offsets(net, mine, timesteps, progress) if offsets else {}
    norms = constant_norms(net, mine, prefix_tokens, tokens, progress)
    hists = collect_statistics(net, mine, per_channel=per_channel, progress=progress, prefix_tokens=prefix_tokens,
                               tokens=tokens)
    report = {}
    for name, module in net.named_modules():
        if not isinstance(module, BaseNeuron):
            continue
        if name not in hists:
            raise ValueError(f"neuron {name} saw no input during calibration: is it on the model's forward path?")
        parts = [choose_thresholds(h, method, module.max_level, module.signed, percentile, timesteps)
                 for h in hists[name]]
        # a prefix token's row only widens the range: it rests on one value per image, the other tokens' row
        # on many, so alone it is a poor guard against clipping on images not seen here
        parts = [torch.maximum(p, parts[-1]) for p in parts]
        # [P + 1, C] (or [P + 1, 1]) rows per token group; one group: a scalar or [C] as before
        theta = parts[0] if len(parts) == 1 else torch.stack([p.reshape(-1) for p in parts])
        module.threshold = nn.Parameter(theta.to(module.threshold.device), requires_grad=False)
        report[name] = {
            **offset_report.get(name, {}),
            "threshold": theta.tolist(),
            "max_input": max(float(h.maximum(module.signed).max()) for h in hists[name]),
            "clipped": _mean([float(h.fraction_above(p.double().reshape(-1) * module.max_level, module.signed).mean())
                              for h, p in zip(hists[name], parts)], hists[name]),
            "expected_error": _mean([float(expected_error(h, p.reshape(-1).numpy(), module.max_level, timesteps,
                                                          module.signed).mean())
                                     for h, p in zip(hists[name], parts)], hists[name]),
        }
    report.update(norms)
    report.update(output_affine(net, mine, timesteps, progress))  # ssa / a2os2a: onto the softmax attention's scale
    if correction == "bias":
        for name, shift in bias_correction(net, mine, timesteps, step_mode, progress).items():
            report[f"{name}.neuron"]["bias_shift"] = shift
    for name, rate in firing_rates(net, [batches[0][:FIRING_RATE_IMAGES]], timesteps, step_mode).items():
        report[name]["firing_rate"] = rate
    return report


def _mean(values, hists) -> float:
    """The mean over token groups, weighted by how many values each group saw."""
    weights = [float(h.count.sum()) for h in hists]
    return sum(v * w for v, w in zip(values, weights)) / max(1.0, sum(weights))


def _rank_shard(batches):
    """Under torchrun, this rank's batches (rank, rank + world, ...); all of them otherwise."""
    if 0 < len(batches) < world_size():
        raise ValueError(f"{len(batches)} calibration batches cannot be shared by {world_size()} processes: use "
                         f"fewer processes (nproc_per_node), more calibration images or smaller batches")
    return shard(batches)


def _take(batches, num_images: Optional[int]):
    """Batches up to ``num_images`` images in all (the last one cut)."""
    seen = 0
    for images in batches:
        if num_images is not None and seen >= num_images:
            return
        if num_images is not None:
            images = images[:num_images - seen]
        seen += len(images)
        yield images
