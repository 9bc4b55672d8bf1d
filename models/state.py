"""State shared by every spiking building block, and helpers that walk the module tree.

Step mode ('s'): one call = one timestep, state carried between calls.
Multi-step mode ('m'): one call = all T timesteps, time folded into the batch
dimension t-major (rows [t*B:(t+1)*B] are step t+1), so Linear/Conv layers and
timm's own forward code run unchanged on [T*B, ...] tensors. A multi-step call
starts from a reset state and keeps none afterwards (no tensor outlives the call,
which lets recomputation in the backward pass free each block's activations),
unless ``carry`` is set: then, without autograd, it continues from the state the
previous call left and leaves its own, so T steps can run as consecutive chunks of
steps (``run_steps(..., chunk=c)``) with the outputs of one call over all T.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class StatefulModule(nn.Module):
    """Base of neurons and expectation-compensation modules: holds state, `reset()`, step modes."""

    def __init__(self) -> None:
        super().__init__()
        self.step_mode = "s"
        self.timesteps = 1  # T of the folded batch in multi-step mode
        self.carry = False  # multi-step: continue from the previous call's state and keep it (no autograd)

    def reset(self) -> None:
        raise NotImplementedError

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """[T*B, ...] -> [T, B, ...]."""
        if x.shape[0] % self.timesteps:
            raise ValueError(f"multi-step input of batch {x.shape[0]} is not a multiple of T={self.timesteps}")
        return x.reshape(self.timesteps, x.shape[0] // self.timesteps, *x.shape[1:])

    @staticmethod
    def fold(x: torch.Tensor) -> torch.Tensor:
        """[T, B, ...] -> [T*B, ...]."""
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    def step_index(self, like: torch.Tensor) -> torch.Tensor:
        """t = 1..T shaped [T, 1, ..., 1] to broadcast against an unfolded ``like``."""
        t = torch.arange(1, self.timesteps + 1, dtype=like.dtype, device=like.device)
        return t.reshape(-1, *([1] * (like.dim() - 1)))

    def carried(self) -> bool:
        """Whether this multi-step call continues the previous one's state."""
        if self.carry and torch.is_grad_enabled():
            raise ValueError("chunked multi-step simulation (carry) runs without autograd; fine-tuning runs all "
                             "T steps in one call")
        return self.carry

    def forward(self, *args, **kwargs):
        return self.multi_step(*args, **kwargs) if self.step_mode == "m" else self.single_step(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"


def stateful_modules(net: nn.Module):
    return (m for m in net.modules() if isinstance(m, StatefulModule))


def reset_net(net: nn.Module) -> None:
    """Clear the state of every spiking module in ``net``."""
    for m in stateful_modules(net):
        m.reset()


def set_step_mode(net: nn.Module, mode: str, timesteps: int = 1, carry: bool = False) -> None:
    """Put every spiking module of ``net`` in step ('s') or multi-step ('m') mode over ``timesteps``
    (``carry``: multi-step calls continue from the previous call's state)."""
    if mode not in ("s", "m"):
        raise ValueError(f"unknown step_mode {mode!r}: use 's' (step) or 'm' (multi-step)")
    for m in stateful_modules(net):
        m.step_mode = mode
        m.timesteps = timesteps
        m.carry = carry


def run_steps(net: nn.Module, x: torch.Tensor, timesteps: int, step_mode: str = "s",
              chunk: Optional[int] = None) -> torch.Tensor:
    """Feed ``x`` (the same input at every step) for ``timesteps`` steps from a reset state; in multi-step mode
    ``chunk`` steps per call (default: all), without autograd.

    Returns [T, *out_shape]: the output of each step (not yet averaged). State is cleared afterwards."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer (steps per multi-step call) or None, got {chunk!r}")
    reset_net(net)
    try:
        if step_mode == "m":
            outs, done = [], 0
            while done < timesteps:
                n = min(chunk or timesteps, timesteps - done)
                set_step_mode(net, "m", n, carry=n < timesteps)
                out = net(x.repeat(n, *([1] * (x.dim() - 1))))
                outs.append(out.reshape(n, x.shape[0], *out.shape[1:]))
                done += n
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        set_step_mode(net, "s")
        return torch.stack([net(x) for _ in range(timesteps)])
    finally:
        reset_net(net)
        for m in stateful_modules(net):
            m.carry = False
