"""Spiking self-attention built from a timm ``Attention`` module's own layers.

    s_q, s_k, s_v = SN(q_norm(q)), SN(k_norm(k)), SN(v)       q, k, v = qkv(SN(x))
    A = SN(ECM_softmax(scale * ECM_product(s_q, s_k^T)))
    out = proj(SN(norm(ECM_product(A, s_v))))
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from models.ecm import ExpectationCompensation, SpikeProduct
from models.neurons import BaseNeuron


class SpikingAttention(nn.Module):
    """Multi-head attention on spike streams, softmax kept and computed in expectation."""

    def __init__(self, attn: nn.Module, make_neuron: Callable[[bool], BaseNeuron],
                 qkv: nn.Module, q_norm: nn.Module, k_norm: nn.Module, norm: nn.Module, proj: nn.Module,
                 fixed_tokens: bool = True) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv, self.q_norm, self.k_norm, self.norm, self.proj = qkv, q_norm, k_norm, norm, proj
        self.q_neuron, self.k_neuron, self.v_neuron = make_neuron(True), make_neuron(True), make_neuron(True)
        self.qk = SpikeProduct()
        self.softmax = ExpectationCompensation(nn.Softmax(dim=-1))
        self.attn_neuron = make_neuron(False)
        # its last axis is the key position: per-key thresholds only where the token count is fixed
        self.attn_neuron.channelwise = fixed_tokens
        self.av = SpikeProduct()
        self.attn_drop = attn.attn_drop
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SpikingAttention does not support attention masks or causal attention")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.q_neuron(self.q_norm(q))
        k = self.k_neuron(self.k_norm(k))
        v = self.v_neuron(v)
        attn = self.qk(q, k.transpose(-2, -1)) * self.scale
        attn = self.attn_neuron(self.attn_drop(self.softmax(attn)))
        x = self.av(attn, v)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))
