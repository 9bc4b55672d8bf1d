"""The converted network and its simulation over T timesteps."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from convert.resources import freed_memory_reused
from models.state import run_steps

COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile=True


@contextmanager
def _recompile_limits(limit: int = 1024):
    """Room for one graph per distinct rewritten module (each has its own traced code), and for the step
    index turning from a constant into a variable: torch's default of 8 recompilations falls back to eager."""
    import torch._dynamo.config as dynamo
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(dynamo, n)]
    with dynamo.patch(**{n: max(limit, getattr(dynamo, n)) for n in names}):
        yield


def check_timesteps(timesteps: Any) -> int:
    """``timesteps`` if it is a valid T (the config key's rule), else the key's one-line ValueError."""
    from convert.schema import keys_by_path
    keys_by_path()["timesteps"].check(timesteps)
    return timesteps


def input_spec(model: nn.Module, size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """What images ``model`` takes: channels, height and width (``size``, else the model's own), and whether
    other sizes are allowed (``dynamic``: ViTs built with dynamic_img_size, in multiples of ``patch``)."""
    embed = getattr(model, "patch_embed", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # the stem, in module order
        channels = first.in_channels if first is not None else cfg.get("input_size", (3,))[0]
        own = getattr(embed, "img_size", None) or cfg.get("input_size", (3, 224, 224))[1:]
        size = (channels, *((own, own) if isinstance(own, int) else own))
    patch = getattr(embed, "patch_size", None) or (1, 1)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    return {"channels": int(size[0]), "size": [int(v) for v in size[1:]], "dynamic": dynamic,
            "patch": [int(p) for p in patch], "pad": bool(getattr(embed, "dynamic_img_pad", False))}


def check_images(spec: Dict[str, Any], x: Any) -> None:
    """Images must be a finite float tensor [B, C, H, W] of the size the network was converted for."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"images must be a tensor [batch, channels, height, width], got {shape}")
    if x.shape[1] != spec["channels"]:
        raise ValueError(f"images have {x.shape[1]} channels but the model expects {spec['channels']}")
    size = tuple(spec["size"])
    if not spec["dynamic"] and tuple(x.shape[-2:]) != size:
        raise ValueError(f"images are {tuple(x.shape[-2:])} pixels but the model expects {size} "
                         f"(build the model with dynamic_img_size=True for other sizes)")
    patch = tuple(spec["patch"])
    if spec["dynamic"] and not spec["pad"] and (x.shape[-2] % patch[0] or x.shape[-1] % patch[1]):
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {patch}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf values")


class SpikingModel(nn.Module):
    """A converted ViT: ``simulate`` runs it for T steps; ``forward`` returns the mean output over T."""

    def __init__(self, net: nn.Module, timesteps: int, options: Dict[str, Any], step_mode: str = "s",
                 inputs: Optional[Dict[str, Any]] = None, chunk: Optional[int] = None, compile: bool = False) -> None:
        super().__init__()
        self.net = net
        self.inputs = inputs or input_spec(net)  # the images the network takes (see input_spec)
        self.timesteps = check_timesteps(timesteps)
        self.options = dict(options)
        if step_mode not in ("s", "m"):
            raise ValueError(f"unknown step_mode {step_mode!r}: use 's' (step) or 'm' (multi-step)")
        self.step_mode = step_mode
        self.chunk = chunk  # multi-step mode: steps per call (None: all T); memory grows with it, not with T
        self.compiled = compile  # the compile option: simulate through torch.compile (nn.Module.compile stays)
        self.calibration_report: Dict[str, dict] = {}
        self.finetune_report: Optional[Dict[str, Any]] = None
        self.architecture: Optional[Dict[str, Any]] = None  # timm name and kwargs of the ANN, for checkpoints

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, timesteps: Optional[int] = None) -> torch.Tensor:
        """[T, B, classes]: the running mean of the output after steps 1, 2, ..., T."""
        T = check_timesteps(self.timesteps if timesteps is None else timesteps)
        check_images(self.inputs, x)
        x = x.to(next(self.net.parameters()).device)
        with freed_memory_reused(x.device):
            if self.compiled:  # a wrapper per call, outside the module tree; torch keeps the compiled code
                with _recompile_limits():
                    net = torch.compile(self.net, backend=COMPILE_BACKEND)
                    out = run_steps(net, x, T, self.step_mode, chunk=self.chunk)
            else:
                out = run_steps(self.net, x, T, self.step_mode, chunk=self.chunk)
        steps = torch.arange(1, T + 1, dtype=out.dtype, device=out.device).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.cumsum(out, 0) / steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x)[-1]
