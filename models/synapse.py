"""A Linear/Conv layer whose input is a spike stream: y(t) = W s(t) + b (+ c), s = neuron(x).

``bias_shift`` c is the calibration's bias correction: it applies to the spiking
network only, so analog mode (neurons as identity) still computes the ANN exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.neurons import BaseNeuron


class SpikingSynapse(nn.Module):
    """``layer(neuron(x)) + bias_shift``: every input the layer sees is in the neuron's spike alphabet."""

    def __init__(self, neuron: BaseNeuron, layer: nn.Module) -> None:
        super().__init__()
        self.neuron = neuron
        self.layer = layer
        self.bias_shift: Optional[torch.Tensor]
        self.register_buffer("bias_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(self.neuron(x))
        if self.bias_shift is not None and not self.neuron.analog:
            y = y + (self.bias_shift[:, None, None] if y.dim() == 4 else self.bias_shift)
        return y
