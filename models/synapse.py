"""A Linear/Conv layer whose input is a spike stream: y(t) = W s(t) + b, s = neuron(x)."""
from __future__ import annotations

import torch
from torch import nn

from models.neurons import BaseNeuron


class SpikingSynapse(nn.Module):
    """``layer(neuron(x))``: every input the layer sees is in the neuron's spike alphabet."""

    def __init__(self, neuron: BaseNeuron, layer: nn.Module) -> None:
        super().__init__()
        self.neuron = neuron
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.neuron(x))
