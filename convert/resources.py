"""Memory a run will need, estimated before any expensive work, and refused with the estimate and the limit.

The ANN's activations for one image are counted on fake tensors (no computation, no memory): A = the elements
of every leaf module's output, M = the largest of them. The SNN keeps about 2 A elements per image between
steps (membranes, running sums and previous values of the expectation-compensated functions and products);
a step adds transients of about 4 M. Multi-step mode keeps no state but holds each layer for all T steps at
once (about 6 M T; in chunks of c steps 6 M c, plus the 2 A of state the chunks carry); fine-tuning (BPTT
in multi-step mode) stores every activation of every step for the backward pass (about 3 A T, a third of it
with block recomputation). float32: 4 bytes an element. Measured on an H200 (BENCHMARKS.md), ViT-S/ViT-B at
batch 64 and T=16 need 0.65-0.85x these estimates.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from torch import nn

BYTES = 4
SAFETY = 0.9  # share of the available memory a run may plan to use
# glibc's mallopt parameters (malloc.h) and the settings a user may have made through the environment
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
USER_MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_host_heap = {"decided": False, "libc": None}  # libc: glibc, once it keeps freed memory


def activation_elements(model: nn.Module, inputs: Dict) -> Tuple[int, int]:
    """(A, M): all leaf-module output elements, and the largest one, for one image (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    sizes = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            device = next(model.parameters()).device  # the probe runs where the model's weights are
            model(torch.empty(1, inputs["channels"], *inputs["size"], device=device))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


def estimate_bytes(elements: Tuple[int, int], batch: int, timesteps: int, step_mode: str,
                   training: bool = False, grad_checkpoint: bool = False, chunk: Optional[int] = None) -> int:
    """Bytes a run needs beyond the model, from (A, M) = ``activation_elements``: multi-step 6 M c + 2 M per
    image for calls of c steps (c = T, or ``chunk``), plus step mode's state 2 A when chunks carry it (every
    neuron's membrane, every compensation's running sums); step mode 2 A + 4 M."""
    total, largest = elements
    if training:
        per_image = 3 * total * timesteps / (3 if grad_checkpoint else 1) + 6 * largest * timesteps
    elif step_mode == "m":
        steps = min(timesteps, chunk or timesteps)
        per_image = 6 * largest * steps + 2 * largest + (2 * total if steps < timesteps else 0)
    else:
        per_image = 2 * total + 4 * largest
    return int(BYTES * batch * per_image)


def available_bytes(device: torch.device) -> int:
    """Free memory where the run computes: the GPU's, else the machine's (MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: no limit


def check_memory(model: nn.Module, inputs: Dict, device: torch.device, what: str, batch: int, timesteps: int,
                 step_mode: str, training: bool = False, grad_checkpoint: bool = False,
                 elements: Tuple[int, int] = None, chunk: Optional[int] = None) -> int:
    """ValueError naming the estimate, the limit and the setting to lower when ``what`` would not fit."""
    elements = elements or activation_elements(model, inputs)
    need = estimate_bytes(elements, batch, timesteps, step_mode, training, grad_checkpoint, chunk)
    limit = available_bytes(device)
    if need > SAFETY * limit:
        hint = "finetune.batch_size or finetune.timesteps, or set finetune.grad_checkpoint=true" if training else \
            ("data.batch_size or chunk, or use step_mode=s (memory flat in T)" if step_mode == "m" else "data.batch_size")
        chunked = f", chunk={chunk}" if chunk else ""
        raise ValueError(f"{what} needs about {need / 2 ** 30:.1f} GiB (estimate, batch {batch}, T={timesteps}, "
                         f"step_mode={step_mode}{chunked}) but {limit / 2 ** 30:.1f} GiB are available on "
                         f"{device.type}: lower {hint}")
    return need


@contextmanager
def freed_memory_reused(device: torch.device):
    """On the CPU: freed host memory is kept for the next tensors within the block (``keep_freed_memory``), and
    at its end the free pages go back to the system (glibc's ``malloc_trim``), so that between simulations a
    process holds its live tensors only, not the largest heap any call needed."""
    kept = device.type == "cpu" and keep_freed_memory()
    try:
        yield
    finally:
        if kept:
            _host_heap["libc"].malloc_trim(0)


def keep_freed_memory() -> bool:
    """Keep freed host memory in the process for the next tensors (glibc: ``mallopt(M_MMAP_MAX, 0)``, large
    blocks come from the heap instead of their own mapping, and ``mallopt(M_TRIM_THRESHOLD, -1)``, the heap is
    only given back by ``malloc_trim``), as PyTorch's CUDA allocator does on a GPU.

    By default glibc maps every block above its mmap threshold (32 MiB at most) on allocation and unmaps it on
    free, so the kernel zeroes it page by page again at the next allocation: multi-step simulation of ViT-B/16
    (batch 8, T=16, 310 MB per activation) took 3.9 million page faults and 10 s of system time per call, which
    made it slower than step mode (BENCHMARKS.md, speed). The cost: the heap keeps the fragments the reuse
    leaves (that simulation's peak: 1.8-2.0 GB instead of 1.35-1.45 GB, about step mode's) until ``malloc_trim``.
    Decided once per process (``freed_memory_reused`` calls it); it changes nothing where the user set glibc's
    malloc through the environment (GLIBC_TUNABLES=glibc.malloc.*, MALLOC_MMAP_THRESHOLD_, ...: the way to opt
    out), where an allocator is preloaded (LD_PRELOAD of jemalloc, tcmalloc, mimalloc) or off glibc. Returns
    whether it applies."""
    if _host_heap["decided"]:
        return _host_heap["libc"] is not None
    _host_heap["decided"] = True
    user_set = any(os.environ.get(k) for k in USER_MALLOC_SETTINGS) or "glibc.malloc." in \
        os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", "")
    try:
        libc = ctypes.CDLL(None)
        glibc = all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim"))
    except (OSError, TypeError):  # no C library to open by name None (Windows)
        glibc = False
    if glibc and not user_set and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1):
        _host_heap["libc"] = libc
    return _host_heap["libc"] is not None
