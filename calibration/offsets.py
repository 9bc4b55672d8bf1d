"""Input offsets of unsigned neurons in front of Linear layers.

An unsigned neuron (binary under residual=spike_driven) clips its input x at 0, and a Linear layer after
LayerNorm sees as many negative inputs as positive ones. With an offset o >= 0 per input channel the
neuron represents x + o and the layer subtracts W o (models.synapse.SpikingSynapse):

    y = W (Q(x + o) - o) + b = W Q(x + o) + (b - W o)

so inputs down to -o are kept; the spikes stay in the neuron's alphabet (W o is a constant, like a bias).
Per channel, o = min(r, largest -x seen), r the mse range of the signed quantiser of x for the run's T and
the neuron's levels (calibration.thresholds): the clip a signed neuron would choose for the negative side,
never beyond the data. Measured on the ANN's activations (during the pass the offset neurons pass x
unclipped), before the thresholds, which are then chosen for x + o.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List

import torch
from torch import nn

from calibration.statistics import collect_statistics
from calibration.thresholds import mse_ranges
from models.synapse import SpikingSynapse


@contextmanager
def _unclipped(synapses: List[SpikingSynapse]):
    """The synapses without offsets, their neurons passing negative inputs in analog mode (as signed ones do)."""
    signed = [s.neuron.signed for s in synapses]
    for s in synapses:
        s.input_offset = None
        s.neuron.signed = True
    try:
        yield
    finally:
        for s, was in zip(synapses, signed):
            s.neuron.signed = was


def input_offsets(net: nn.Module, batches: List[torch.Tensor], timesteps: int,
                  progress: bool = True) -> Dict[str, dict]:
    """Set ``input_offset`` of every synapse with an unsigned neuron in front of a Linear layer whose input
    goes negative on ``batches``; returns {neuron name: {"input_offset": o}} for those."""
    synapses = {name: m for name, m in net.named_modules()
                if isinstance(m, SpikingSynapse) and m.linear and not m.neuron.signed}
    if not synapses:
        return {}
    with _unclipped(list(synapses.values())):
        hists = collect_statistics(net, batches, per_channel=True, progress=progress,
                                   only={s.neuron for s in synapses.values()})
    report = {}
    for name, syn in synapses.items():
        hist = hists[f"{name}.neuron"][0]
        signed_range = mse_ranges(hist, syn.neuron.max_level, timesteps, signed=True)
        offset = torch.minimum(signed_range, hist.max_neg).to(torch.float32)
        if offset.any():
            syn.input_offset = (offset if hist.channels else offset.reshape(())).to(syn.neuron.threshold.device)
            report[f"{name}.neuron"] = {"input_offset": syn.input_offset.tolist()}
    return report
