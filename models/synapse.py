"""Layers whose inputs are spike streams.

``SpikingSynapse``: a Linear/Conv layer (a module, or ``F.linear`` / ``F.conv2d`` with the
weights passed as arguments) fed through a neuron, y(t) = W s(t) + b (+ c), s = neuron(x).
``bias_shift`` c is the calibration's bias correction: it applies to the spiking network only,
so analog mode (neurons as identity) still computes the ANN exactly. ``input_offset`` o (calibration.offsets):
an unsigned neuron in front of a Linear layer represents x + o, and the layer subtracts W o,
y(t) = W s(t) + b - W o with s = neuron(x + o): the spikes stay in the neuron's alphabet (binary for
residual=spike_driven) while inputs down to -o are kept instead of clipped at 0.

``SpikingProduct``: a product of two activation streams (Q K^T, A V, a SwiGLU gate) with a
neuron on each operand, computed in expectation (``SpikeProduct``) or step by step.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from models.neurons import BaseNeuron


def dense_macs(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """MACs of one dense pass of a Linear (weight [out, in]) or ConvNd (weight [out, in / groups, *kernel])."""
    if weight.dim() == 2:
        return float(x.numel() // weight.shape[1] * weight.numel())
    return float(y.numel() * weight[0].numel())


class SpikingSynapse(nn.Module):
    """``layer(neuron(x + o), *args) - W o + bias_shift``: every input the layer sees is in the neuron's spike
    alphabet (o: ``input_offset``, None for none)."""

    def __init__(self, neuron: BaseNeuron, layer: Union[nn.Module, Callable]) -> None:
        super().__init__()
        self.neuron = neuron
        self.layer = layer
        self.bias_shift: Optional[torch.Tensor]
        self.register_buffer("bias_shift", None)
        self.input_offset: Optional[torch.Tensor]
        self.register_buffer("input_offset", None)

    @property
    def linear(self) -> bool:
        """Whether the layer is a Linear map of the last axis (``nn.Linear`` or ``F.linear``)."""
        return isinstance(self.layer, nn.Linear) or self.layer is torch.nn.functional.linear

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        o = self.input_offset
        if o is None:
            y = self.layer(self.neuron(x), *args, **kwargs)
        else:
            weight = self.layer_weight(args, kwargs)
            y = self.layer(self.neuron(x + o), *args, **kwargs) - \
                torch.nn.functional.linear(o.expand(weight.shape[-1]), weight)
        if self.bias_shift is not None and not self.neuron.analog:
            y = y + (self.bias_shift.reshape(-1, *([1] * (y.dim() - 2))) if self.channel_first(y) else self.bias_shift)
        return y

    def channel_first(self, y: torch.Tensor) -> bool:
        """Outputs of convolutions keep channels on axis 1; Linear outputs keep them last."""
        return not self.linear and y.dim() > 2

    def layer_weight(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The weight of the layer: its own, or (``F.linear`` / ``F.conv2d``) the argument after the input."""
        if isinstance(self.layer, nn.Module):
            return self.layer.weight
        return args[0] if args else kwargs["weight"]


class StepProduct(nn.Module):
    """``op(A, B)`` at every step (no expectation compensation): with spike operands, only accumulations."""

    def __init__(self, op: Callable = torch.matmul) -> None:
        super().__init__()
        self.op = op

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.op(a, b)


class SpikingProduct(nn.Module):
    """``product(neuron_a(a), neuron_b(b))``: a product of two activation streams fed with spikes."""

    def __init__(self, neuron_a: Optional[BaseNeuron], neuron_b: Optional[BaseNeuron], product: nn.Module) -> None:
        super().__init__()
        self.neuron_a, self.neuron_b, self.product = neuron_a, neuron_b, product

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a if self.neuron_a is None else self.neuron_a(a)
        b = b if self.neuron_b is None else self.neuron_b(b)
        return self.product(a, b)

    def products(self) -> List[Tuple[nn.Module, Optional[BaseNeuron], Optional[BaseNeuron], bool]]:
        """(product, neuron of A, neuron of B, B transposed) for operation counting."""
        return [(self.product, self.neuron_a, self.neuron_b, False)]
