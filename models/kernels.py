"""Fused kernels for the integrate-and-fire update (inference: rate coding, no autograd): Triton on CUDA, a C
loop on the CPU (``models.native``).

One pass per step instead of five element-wise kernels (addcdiv, floor, clamp, sub, mul)::

    u <- u + x / theta   (first step: x / theta + v_init);  k = clamp(floor(u), lo, hi);  u <- u - k;  out = k theta

``if_sequence`` runs all T steps of a multi-step call in one kernel (a step-mode call is a sequence of one),
the membrane held in registers (Triton) or in the L1 cache (C): each step reads x(t) and writes out(t), nothing
else. Every operation is IEEE float32 with round-to-nearest (division included) in the eager path's order, so
outputs are bitwise those of the eager path (tests/test_fused.py runs the Triton kernel through Triton's
interpreter on the CPU, the C kernel, and the Triton kernel on CUDA where there is one; benchmarks.speed compares
whole simulations). Anything else (other neurons, differential coding, autograd, dtypes other than float32,
small single CUDA steps: SINGLE_STEP_MIN_ELEMENTS, CPU tensors where no C compiler is found) keeps the eager path.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Tuple

import torch

from models import native

try:
    import triton
    import triton.language as tl
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6):  # the oldest Triton these ran on
        triton = None
except ImportError:  # a CPU-only torch: the eager path everywhere
    triton = None

BLOCK = 1024
# A single step (step mode, or a multi-step call of one step) of fewer elements than this keeps the eager path:
# there the step is launch-bound and Triton's launch costs the CPU more than the five eager kernels do. Measured
# on an H200 (BENCHMARKS.md, speed-cuda): ViT-S/16 at batch 64 (4.8M elements per neuron) 0.90-0.98x the eager
# speed in step mode, ViT-B/16 (9.7M) 1.20-1.24x; a call of two steps or more is faster at every size measured.
SINGLE_STEP_MIN_ELEMENTS = 2 ** 23
_mode = {"enabled": True, "interpret": False, "single_step_min": SINGLE_STEP_MIN_ELEMENTS}


@contextmanager
def _set(**mode):
    before = dict(_mode)
    _mode.update(mode)
    try:
        yield
    finally:
        _mode.update(before)


def disabled():
    """Run the eager path even where a kernel applies (benchmarks and tests compare both)."""
    return _set(enabled=False)


def interpreted():
    """Run the kernels on CPU tensors through Triton's interpreter (tests: the same source as on CUDA)."""
    return _set(interpret=True)


def single_steps_from(elements: int):
    """Fuse single steps from this many elements (tests: 0, every step) instead of SINGLE_STEP_MIN_ELEMENTS."""
    return _set(single_step_min=elements)


def usable(x: torch.Tensor, steps: int = 1) -> bool:
    """Whether a kernel runs ``steps`` steps of inputs like ``x`` (one step's): float32, no autograd, and either
    on the CPU with the C kernel built, or on a CUDA device (or interpreted) with Triton installed and two steps
    or more or a single step of at least SINGLE_STEP_MIN_ELEMENTS elements."""
    if not _mode["enabled"] or x.dtype != torch.float32 or torch.is_grad_enabled():
        return False
    if x.is_cuda or _mode["interpret"]:
        return triton is not None and (steps > 1 or x.numel() >= _mode["single_step_min"])
    return cpu_usable(x)


def cpu_usable(x: torch.Tensor) -> bool:
    """Whether the C kernels (models.native) run on ``x``: float32 on the CPU, no autograd, built."""
    return (_mode["enabled"] and not torch.is_grad_enabled() and x.dtype == torch.float32
            and x.device.type == "cpu" and native.library() is not None)


def theta_block(theta: torch.Tensor, step_shape) -> torch.Tensor:
    """The threshold as a contiguous block that repeats along the flattened step: theta broadcast to
    ``step_shape`` with its leading broadcast (stride-0) dimensions dropped; element i uses block[i % size]."""
    full = torch.broadcast_to(theta, step_shape)
    lead = 0
    while lead < len(step_shape) and full.stride(lead) == 0:
        lead += 1
    return full[(0,) * lead].contiguous()


if triton is not None:
    def _if_source(xs_ptr, u_ptr, out_ptr, theta_ptr, n, steps, period, v_init, lo, hi,
                   FRESH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        theta = tl.load(theta_ptr + offs % period, mask=mask, other=1.0)
        if FRESH:  # v_init + x / theta at the first step: IEEE addition commutes, so bitwise x / theta + v_init
            u = theta * 0.0 + v_init
        else:
            u = tl.load(u_ptr + offs, mask=mask)
        x_ptrs, out_ptrs = xs_ptr + offs, out_ptr + offs  # advanced by n per step (64-bit pointer arithmetic)
        for _ in range(steps):
            u = u + tl.math.div_rn(tl.load(x_ptrs, mask=mask), theta)
            k = tl.minimum(tl.maximum(tl.floor(u), lo), hi)
            u = u - k
            tl.store(out_ptrs, k * theta, mask=mask)
            x_ptrs += n
            out_ptrs += n
        tl.store(u_ptr + offs, u, mask=mask)

    _COMPILED = triton.jit(_if_source)
    _INTERPRETED = None  # built on first use: Triton's interpreter runs the same source on CPU tensors


def _kernel():
    global _INTERPRETED
    if not _mode["interpret"]:
        return _COMPILED
    if _INTERPRETED is None:
        from triton.runtime.interpreter import InterpretedFunction
        _INTERPRETED = InterpretedFunction(_if_source)
    return _INTERPRETED


def if_sequence(xs: torch.Tensor, u: Optional[torch.Tensor], block: torch.Tensor, v_init: float, lo: int,
                hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """All steps of unfolded inputs ``xs`` [T, B, ...] from membrane ``u`` (None: reset) in one kernel, with the
    threshold as ``theta_block`` gives it: (outputs k theta [T, B, ...], final membrane). A given ``u`` is
    updated in place when contiguous."""
    if not (xs.is_cuda or _mode["interpret"]):
        return native.if_sequence(xs, u, block, v_init, lo, hi)
    xs = xs.contiguous()
    fresh = u is None
    u = torch.empty_like(xs[0]) if fresh else u.contiguous()
    out = torch.empty_like(xs)
    n = xs[0].numel()
    _kernel()[(triton.cdiv(n, BLOCK),)](xs, u, out, block, n, xs.shape[0], block.numel(), float(v_init), float(lo),
                                        float(hi), FRESH=fresh, BLOCK=BLOCK)
    return out, u
