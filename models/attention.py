"""Spiking self-attention built from a timm ``Attention`` module's own layers (DESIGN section 4).

All variants share q, k, v = split(qkv(SN(x))), q_norm / k_norm kept, and
out = proj(norm(attention(q, k, v))); they differ in ``attend``:

    ecm     s_q, s_k, s_v = SN(q), SN(k), SN(v)
            A = SN(ECM_softmax(scale * ECM_product(s_q, s_k^T)));  out = ECM_product(A, s_v)
    psa     ecm with random masks on s_q, s_k and A: mask(x) = x * Bernoulli(1 - p), no rescaling
    ssa     Spikformer: Q, K, V = IF(q), IF(k), IF(v) in {0, 1};  out = 0.125 * Q K^T V at every step,
            no softmax; proj's input neuron becomes a binary IF neuron: SN(0.125 Q K^T V)
    a2os2a  A2OS2A: Q = IF(q) in {0, 1}, K = ReLU(k) real >= 0, V = ternary(v) in {-1, 0, 1};
            out = Q K^T V at every step, no softmax, no scale: additions only

The ViT's LayerNorms are kept (read through expectation compensation); there is no
BatchNorm to fold. ssa and a2os2a compute their products step by step (as the papers
do), so their mean output is not the ANN's: they need fine-tuning over T.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from models.ecm import ExpectationCompensation, SpikeProduct
from models.neurons import BaseNeuron, IFNeuron, TernaryNeuron
from models.state import StatefulModule

SPIKFORMER_SCALE = 0.125


class StepProduct(nn.Module):
    """A @ B at every step (no expectation compensation): with spike operands, only accumulations."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class BernoulliMask(StatefulModule):
    """x * Bernoulli(1 - p), no rescaling; masks drawn step by step from a generator seeded at ``reset``,
    so step and multi-step mode draw the same masks and every simulation repeats exactly."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = float(p), int(seed)
        self.analog = False  # the identity while the network computes its ANN (calibration, reference)
        self.generator: Optional[torch.Generator] = None

    def reset(self) -> None:
        self.generator = None

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != like.device:
            self.generator = torch.Generator(device=like.device).manual_seed(self.seed)
        keep = torch.rand(like.shape, generator=self.generator, device=like.device) >= self.p
        return keep.to(like.dtype)

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.analog else x * self._mask(x)

    def multi_step(self, x: torch.Tensor) -> torch.Tensor:
        if self.analog:
            return x
        xs = self.unfold(x)
        return self.fold(xs * torch.stack([self._mask(xs[t]) for t in range(xs.shape[0])]))

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, {super().extra_repr()}"


class AttentionBase(nn.Module):
    """The shared projections: q, k, v from qkv, q_norm / k_norm, and proj(norm(.)) on the way out."""

    def __init__(self, attn: nn.Module, qkv: nn.Module, q_norm: nn.Module, k_norm: nn.Module, norm: nn.Module,
                 proj: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv, self.q_norm, self.k_norm, self.norm, self.proj = qkv, q_norm, k_norm, norm, proj
        self.attn_drop = attn.attn_drop
        self.proj_drop = attn.proj_drop

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def products(self) -> List[Tuple[nn.Module, Optional[BaseNeuron], Optional[BaseNeuron], bool]]:
        """(product, neuron of A or None, neuron of B or None, B transposed) for operation counting."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} does not support attention masks or causal attention")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self.attend(self.q_norm(q), self.k_norm(k), v)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class SpikingAttention(AttentionBase):
    """Softmax attention on spike streams, computed in expectation (``ecm``); with ``mask_p`` > 0, EST's
    partial-information attention (``psa``)."""

    def __init__(self, attn: nn.Module, make_neuron: Callable[[bool], BaseNeuron], fixed_tokens: bool = True,
                 mask_p: float = 0.0, seed: int = 0, **layers) -> None:
        super().__init__(attn, **layers)
        self.q_neuron, self.k_neuron, self.v_neuron = make_neuron(True), make_neuron(True), make_neuron(True)
        self.qk = SpikeProduct()
        self.softmax = ExpectationCompensation(nn.Softmax(dim=-1))
        self.attn_neuron = make_neuron(False)
        # its last axis is the key position: per-key thresholds only where the token count is fixed
        self.attn_neuron.channelwise = fixed_tokens
        self.av = SpikeProduct()
        masks = [BernoulliMask(mask_p, seed + i) for i in range(3)] if mask_p > 0 else [nn.Identity()] * 3
        self.q_mask, self.k_mask, self.attn_mask = masks

    def attend(self, q, k, v):
        q = self.q_mask(self.q_neuron(q))
        k = self.k_mask(self.k_neuron(k))
        v = self.v_neuron(v)
        attn = self.qk(q, k.transpose(-2, -1)) * self.scale
        attn = self.attn_mask(self.attn_neuron(self.attn_drop(self.softmax(attn))))
        return self.av(attn, v)

    def products(self):
        return [(self.qk, self.q_neuron, self.k_neuron, True), (self.av, self.attn_neuron, self.v_neuron, False)]


class SpikformerAttention(AttentionBase):
    """Spikformer's SSA: SN(0.125 Q K^T V) with binary Q, K, V, step by step, no softmax."""

    def __init__(self, attn: nn.Module, **layers) -> None:
        super().__init__(attn, **layers)
        self.q_neuron, self.k_neuron, self.v_neuron = IFNeuron(1), IFNeuron(1), IFNeuron(1)
        self.qk, self.av = StepProduct(), StepProduct()
        if hasattr(self.proj, "neuron"):  # the SN of SN(s Q K^T V) is proj's input neuron, made binary
            self.proj.neuron = IFNeuron(1)

    def attend(self, q, k, v):
        q, k, v = self.q_neuron(q), self.k_neuron(k), self.v_neuron(v)
        return self.av(self.qk(q, k.transpose(-2, -1)), v) * SPIKFORMER_SCALE

    def products(self):
        return [(self.qk, self.q_neuron, self.k_neuron, True), (self.av, None, self.v_neuron, False)]


class AdditionOnlyAttention(AttentionBase):
    """A2OS2A: Q K^T V with binary Q, non-negative real K = ReLU(k) and ternary V, step by step."""

    def __init__(self, attn: nn.Module, **layers) -> None:
        super().__init__(attn, **layers)
        self.q_neuron, self.k_act, self.v_neuron = IFNeuron(1), nn.ReLU(), TernaryNeuron()
        self.qk, self.av = StepProduct(), StepProduct()

    def attend(self, q, k, v):
        q, k, v = self.q_neuron(q), self.k_act(k), self.v_neuron(v)
        return self.av(self.qk(q, k.transpose(-2, -1)), v)

    def products(self):
        return [(self.qk, self.q_neuron, None, True), (self.av, None, self.v_neuron, False)]
