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

from typing import Dict, Optional, Tuple

import torch
from torch import nn

BYTES = 4
SAFETY = 0.9  # share of the available memory a run may plan to use


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
