"""A spike-friendly normalisation: LayerNorm / RMSNorm with calibrated constant statistics (attention.norm=constant).

A per-token norm divides each token by its own statistics, a reduction over channels at every step
(analog). ``ConstantNorm`` replaces the statistics with constants fitted on calibration images, which
leaves a per-channel affine map of the stream (with own rows for the P prefix tokens, as thresholds):

    y = gain * x + shift        gain, shift: [C], or [P + 1, C] rows (token i < P: row i; the rest: row P)

fitted by least squares per channel onto the ANN's norm output (calibration.corrections.constant_norms)
and trained with the weights. Linear in x, so it needs no expectation compensation and folds into the
neuron that reads it: a neuron with threshold theta on gain * x + shift fires as one with threshold
theta / gain on x + shift / gain (a bias current) and sends the same counts; the energy count gives it
no MAC. (In a post-norm block, whose norm output joins the residual stream, it folds into the weights
and bias of the layer before it instead, one copy per prefix-token row.) Until fitted, and in analog
mode with ``exact`` (the reference, the distillation teacher), it computes the norm it replaces (kept,
frozen, as ``norm``); ``blend`` in [0, 1) mixes the two during fine-tuning:
blend * (gain * x + shift) + (1 - blend) * norm(x).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.tokens import token_rows


class ConstantNorm(nn.Module):
    """gain * x + shift per channel (and prefix-token row) in place of a per-token norm over the last axis."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.requires_grad_(False)
        self.exact = False
        self.blend = 1.0
        self.norm_gain: Optional[nn.Parameter]
        self.norm_shift: Optional[nn.Parameter]
        self.register_parameter("norm_gain", None)
        self.register_parameter("norm_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_gain is None or self.exact:
            return self.norm(x)
        y = x * token_rows(self.norm_gain, x) + token_rows(self.norm_shift, x)
        return y if self.blend >= 1 else self.blend * y + (1 - self.blend) * self.norm(x)
