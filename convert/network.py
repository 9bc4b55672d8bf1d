"""The converted network and its simulation over T timesteps."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from models.state import run_steps


def check_timesteps(timesteps: Any) -> int:
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps <= 0:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    return timesteps


def check_images(net: nn.Module, x: Any) -> None:
    """Images must be a finite float tensor [B, C, H, W] that fits the model's patch embedding."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"images must be a tensor [batch, channels, height, width], got {shape}")
    embed = net.patch_embed
    channels = embed.proj.in_channels
    if x.shape[1] != channels:
        raise ValueError(f"images have {x.shape[1]} channels but the model expects {channels}")
    size = tuple(embed.img_size) if embed.img_size is not None else None
    strict = getattr(embed, "strict_img_size", True) and not getattr(net, "dynamic_img_size", False)
    if strict and size is not None and tuple(x.shape[-2:]) != size:
        raise ValueError(f"images are {tuple(x.shape[-2:])} pixels but the model expects {size} "
                         f"(build the model with dynamic_img_size=True for other sizes)")
    patch = tuple(embed.patch_size)
    if not strict and not getattr(embed, "dynamic_img_pad", False) and (x.shape[-2] % patch[0] or x.shape[-1] % patch[1]):
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {patch}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf values")


class SpikingModel(nn.Module):
    """A converted ViT: ``simulate`` runs it for T steps; ``forward`` returns the mean output over T."""

    def __init__(self, net: nn.Module, timesteps: int, options: Dict[str, Any], step_mode: str = "s") -> None:
        super().__init__()
        self.net = net
        self.timesteps = check_timesteps(timesteps)
        self.options = dict(options)
        if step_mode not in ("s", "m"):
            raise ValueError(f"unknown step_mode {step_mode!r}: use 's' (step) or 'm' (multi-step)")
        self.step_mode = step_mode
        self.calibration_report: Dict[str, dict] = {}
        self.finetune_report: Optional[Dict[str, Any]] = None
        self.architecture: Optional[Dict[str, Any]] = None  # timm name and kwargs of the ANN, for checkpoints

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, timesteps: Optional[int] = None) -> torch.Tensor:
        """[T, B, classes]: the running mean of the output after steps 1, 2, ..., T."""
        T = check_timesteps(self.timesteps if timesteps is None else timesteps)
        check_images(self.net, x)
        x = x.to(next(self.net.parameters()).device)
        out = run_steps(self.net, x, T, self.step_mode)
        steps = torch.arange(1, T + 1, dtype=out.dtype, device=out.device).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.cumsum(out, 0) / steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x)[-1]
