"""Corrections after thresholds (Li et al., "A Free Lunch From ANN", ICML 2021), and spike counts.

Bias correction, layer by layer in network order: with mu_ANN the mean output of a
synapse in analog mode (the ANN) and mu_SNN its mean output over T steps, both per
output channel over the calibration images and tokens,

    c <- c + (mu_ANN - mu_SNN)      (c: the synapse's ``bias_shift``, spiking mode only)

so each layer's SNN mean output matches the ANN's at the target T; later layers
are measured after earlier ones are corrected.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.statistics import analog_mode
from models.distributed import all_reduce
from models.neurons import BaseNeuron
from models.state import run_steps
from models.synapse import SpikingSynapse


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
