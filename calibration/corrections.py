"""Corrections after thresholds (Li et al., "A Free Lunch From ANN", ICML 2021), and spike counts.

Bias correction, layer by layer in network order: with mu_ANN the mean output of a
synapse in analog mode (the ANN) and mu_SNN its mean output over T steps, both per
output channel over the calibration images and tokens,

    c <- c + (mu_ANN - mu_SNN)      (c: the synapse's ``bias_shift``, spiking mode only)

so each layer's SNN mean output matches the ANN's at the target T; later layers
are measured after earlier ones are corrected.

Output maps of softmax-free attention (ssa, a2os2a), core by core in network order: with a the
ANN's attention output softmax(scale q k^T) v and b the variant's mean output over T steps on the
same image, per channel (head, feature) over images and tokens, the least-squares fit

    gain = cov(a, b) / var(b),   shift = mean(a) - gain mean(b)       (gain = 0 where b is constant)

so the variant's output lands on the scale the next layer was trained for. Constant norms
(norm=constant), norm by norm in network order, before the thresholds: the same fit of the ANN's
norm output a onto the norm's input b in analog mode, per channel and prefix-token row.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.statistics import analog_mode, token_groups
from models.attention import ChannelAffine
from models.distributed import all_reduce
from models.neurons import BaseNeuron
from models.normalization import ConstantNorm
from models.state import run_steps
from models.synapse import SpikingSynapse


def _channel_rows(y: torch.Tensor) -> torch.Tensor:
    """Attention outputs [..., heads, tokens, head_dim] as float64 rows of heads x head_dim channels."""
    return y.transpose(-3, -2).reshape(-1, y.shape[-3] * y.shape[-1]).double()


def _channel_sum(y: torch.Tensor):
    """Sum over every axis but the channel axis (last for Linear, 1 for Conv2d outputs), and the row count."""
    y = y.movedim(1, -1) if y.dim() == 4 else y
    rows = y.reshape(-1, y.shape[-1]).double()
    return rows.sum(0), rows.shape[0]


def layer_means(net: nn.Module, layers: List[nn.Module], batches: List[torch.Tensor], timesteps: int = 0,
                step_mode: str = "s") -> List[torch.Tensor]:
    """Mean output per channel of each layer: of the ANN (timesteps=0, analog mode) or over T SNN steps.

    Under torchrun, ``batches`` are this rank's shard and the sums are all-reduced."""
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}

    def hook(module, inputs, output):
        key = id(module)
        total, rows = _channel_sum(output)
        sums[key] = sums.get(key, 0) + total.cpu()
        counts[key] = counts.get(key, 0) + rows

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            for x in batches:
                if timesteps == 0:
                    with analog_mode(net):
                        net(x)
                else:
                    run_steps(net, x, timesteps, step_mode)
    finally:
        for h in handles:
            h.remove()
    means = []
    for layer in layers:
        both = all_reduce(torch.cat([sums[id(layer)], torch.tensor([float(counts[id(layer)])], dtype=torch.float64)]))
        means.append(both[:-1] / both[-1])
    return means


def bias_correction(net: nn.Module, batches: List[torch.Tensor], timesteps: int, step_mode: str = "s",
                    progress: bool = True) -> Dict[str, float]:
    """Shift each synapse's bias so its mean SNN output over ``timesteps`` matches the ANN's.

    Returns the mean absolute shift per layer."""
    synapses = [(name, m) for name, m in net.named_modules() if isinstance(m, SpikingSynapse)]
    targets = layer_means(net, [m for _, m in synapses], batches)
    shifts = {}
    for (name, syn), target in tqdm(list(zip(synapses, targets)), desc="bias correction", disable=not progress,
                                    leave=False):
        current = layer_means(net, [syn], batches, timesteps, step_mode)[0]
        weight = syn.layer.weight
        delta = (target - current).to(device=weight.device, dtype=weight.dtype)
        syn.bias_shift = delta if syn.bias_shift is None else syn.bias_shift + delta
        shifts[name] = float(delta.abs().mean())
    return shifts


def output_affine(net: nn.Module, batches: List[torch.Tensor], timesteps: int,
                  progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Fit every softmax-free attention core's per-channel output map (``ChannelAffine``) to the ANN's attention.

    Returns per core the mean gain and the share of the ANN output's variance the fit explains."""
    names = {m: n for n, m in net.named_modules()}
    affines = [m for m in net.modules() if isinstance(m, ChannelAffine)]
    report = {}
    for affine in tqdm(affines, desc="attention output maps", disable=not progress, leave=False):
        core = net.get_submodule(names[affine].rpartition(".")[0])
        seen: Dict[str, torch.Tensor] = {}
        handles = [core.register_forward_hook(lambda m, i, o: seen.__setitem__("ann", o)),
                   affine.register_forward_hook(lambda m, i, o: seen.__setitem__("snn", i[0]))]
        sums = None
        try:
            with torch.no_grad():
                for x in batches:
                    with analog_mode(net):
                        net(x)
                    a = seen.pop("ann")
                    run_steps(net, x, timesteps, "m")
                    b = seen.pop("snn")
                    b = b.reshape(timesteps, *a.shape).mean(0)
                    dim = a.shape[-1]
                    batch = _moments(_channel_rows(a), _channel_rows(b))
                    sums = batch if sums is None else sums + batch
        finally:
            for h in handles:
                h.remove()
        gain, shift, explained = _least_squares(all_reduce(sums.cpu()))
        like = core.q_neuron.threshold
        affine.out_gain = nn.Parameter(gain.reshape(-1, 1, dim).to(like))
        affine.out_shift = nn.Parameter(shift.reshape(-1, 1, dim).to(like))
        report[names[affine]] = {"mean_gain": float(gain.mean()), "explained_variance": float(explained)}
    return report


class _Captured(Exception):
    """Ends a forward pass once a hook has what it needs."""


def constant_norms(net: nn.Module, batches: List[torch.Tensor], prefix_tokens: int = 0, tokens: Optional[int] = None,
                   progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Fit every ``ConstantNorm``'s gain and shift, in network order: per channel (and prefix-token row, as
    thresholds), the least-squares map from its input in analog mode (earlier norms already constant) onto
    the ANN's norm output on the same images. Returns per norm the mean gain and the explained variance."""
    names = {m: n for n, m in net.named_modules()}
    report = {}
    for norm in tqdm([m for m in net.modules() if isinstance(m, ConstantNorm)], desc="constant norms",
                     disable=not progress, leave=False):
        seen: Dict[str, torch.Tensor] = {}

        def capture(key, value):
            seen[key] = value
            raise _Captured

        handles = [norm.register_forward_hook(lambda m, i, o: capture("ann", o) if m.exact else None),
                   norm.register_forward_pre_hook(lambda m, i: None if m.exact else capture("input", i[0]))]
        sums = None
        try:
            with torch.no_grad():
                for x in batches:
                    for exact in (True, False):
                        with analog_mode(net, exact=exact):
                            try:
                                net(x)
                            except _Captured:
                                pass
                    a, b = seen.pop("ann"), seen.pop("input")
                    groups = zip(token_groups(a, prefix_tokens, tokens), token_groups(b, prefix_tokens, tokens))
                    batch = torch.stack([_moments(*(t.reshape(-1, t.shape[-1]).double() for t in pair))
                                         for pair in groups])
                    sums = batch if sums is None else sums + batch
        finally:
            for h in handles:
                h.remove()
        gain, shift, explained = _least_squares(all_reduce(sums.cpu()).transpose(0, 1))
        if gain.shape[0] == 1:  # one token group: [C]; else [P + 1, C] rows
            gain, shift = gain[0], shift[0]
        norm.norm_gain = nn.Parameter(gain.to(b))
        norm.norm_shift = nn.Parameter(shift.to(b))
        report[names[norm]] = {"mean_gain": float(gain.mean()), "explained_variance": float(explained)}
    return report


def _moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per channel (columns of the float64 rows ``a``, ``b``): sum a, sum b, sum ab, sum b^2, sum a^2, count."""
    return torch.stack([a.sum(0), b.sum(0), (a * b).sum(0), (b * b).sum(0), (a * a).sum(0),
                        torch.full_like(a[0], a.shape[0])])


def _least_squares(sums: torch.Tensor):
    """gain, shift of the fit a ~ gain b + shift from ``_moments`` sums ([6, ...]), and the share of a's
    variance it explains (over all channels)."""
    sa, sb, sab, sbb, saa, n = sums
    mean_a, mean_b = sa / n, sb / n
    cov, var_b, var_a = sab / n - mean_a * mean_b, sbb / n - mean_b ** 2, saa / n - mean_a ** 2
    gain = torch.where(var_b > 1e-12 * var_b.max().clamp_min(1e-30), cov / var_b.clamp_min(1e-30),
                       torch.zeros_like(cov))
    explained = 1 - (var_a - cov * gain).sum() / var_a.sum().clamp_min(1e-30)
    return gain, mean_a - gain * mean_b, explained


def firing_rates(net: nn.Module, batches: List[torch.Tensor], timesteps: int, step_mode: str = "s") -> Dict[str, float]:
    """Events per neuron per step for every neuron (an event is one unit of |k|; MT neurons: one per spike)."""
    events: Dict[str, float] = {}
    elements: Dict[str, int] = {}
    names = {m: n for n, m in net.named_modules() if isinstance(m, BaseNeuron)}

    def hook(module, inputs, output):
        name = names[module]
        events[name] = events.get(name, 0.0) + float(module.events(output).sum())
        elements[name] = elements.get(name, 0) + output.numel()

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            for x in batches:
                run_steps(net, x, timesteps, step_mode)
    finally:
        for h in handles:
            h.remove()
    return {n: events[n] / elements[n] for n in events}
