"""Spiking scaled-dot-product attention: the core softmax(scale Q K^T + mask) V of any timm attention
module, taken from the traced ``F.scaled_dot_product_attention`` call (DESIGN section 4).

The variants differ in ``attend``:

    ecm     s_q, s_k, s_v = SN(q), SN(k), SN(v)
            A = SN(ECM_softmax(scale * ECM_product(s_q, s_k^T) + mask));  out = ECM_product(A, s_v)
    psa     ecm with masks on some of s_q, s_k and A (``mask_operands``; EST: all three): mask(x) = x * m(t),
            m ~ Bernoulli(1 - p) at every step (``mask_schedule=random``, EST) or every element dropped at
            an evenly spaced share p of the steps (``even``, SpikeMask); ``mask_rescale`` divides each
            masked operand's product by 1 - p (folded into the softmax scale for Q K^T and into the
            product's own rescaling for A V: the spikes stay in the alphabet), so the masked products are
            unbiased (the row_max map's normalisation is a ratio, which needs no rescaling of the map).
            ``mask_fanout``: a mask skips only its events' fan-out into the product (MaskedSpikeProduct): the
            product's running sums, and the row_max map's row sums, keep every spike, so a skipped spike is
            missing from one step's increment instead of from every later product
    map (ecm and psa, ``attention_map``): what the attention-map neuron spikes.
            row_max (the default): P = ECM(exp(s - max_k s)), whose every row peaks at exactly 1, through a
            signed neuron; out = ECM((P V) / max(P 1, (1 - p) / 2)) (RowNormalisation; p: psa's mask share
            on the map, else 0): softmax(s) V = P V / (P 1), and P 1 >= 1 for the ANN. One threshold fits a
            peaked row and a diffuse one alike: a diffuse row's entries are near 1 in P, but near 1/N in
            softmax(s), where most fall below theta / (2T) and are sent as nothing.
            softmax: A = SN(ECM(softmax(s))), out = A V (unsigned neuron)
    centring (map=softmax, ``centre_values``): A V = c + A (V - c) for any row-stochastic A and any row c;
            with the spiking map A' the output is A' s_v + (1 - A' 1) c, c = the mean of s_v over the keys
            (ValueCentring): the mass A' lost to rounding (or gained) goes to the mean value instead of to
            0; nothing changes in analog mode, where A' 1 = 1
    ssa     Spikformer: Q, K, V = IF(q), IF(k), IF(v) in {0, 1};  out = 0.125 * Q K^T V at every step,
            no softmax, then the calibrated output map (ChannelAffine); the neuron in front of the next
            Linear is the configured one (signed: the map's output can be negative)
    a2os2a  A2OS2A: Q = IF(q) in {0, 1}, K = ReLU(k) real >= 0, V = ternary(v) in {-1, 0, 1};
            out = Q K^T V at every step, no softmax, no scale: additions only

The additive mask (relative position biases, Swin's shifted-window mask, ALiBi-style terms) is
a constant or a linear function of the streams, added at every step before the softmax. ssa and
a2os2a compute their products step by step (as the papers do), so their mean output is not the
ANN's: they need fine-tuning over T, and they take no mask. In analog mode (calibration, the
reference, the distillation teacher) they compute the ANN's attention softmax(scale q k^T) v, so
their thresholds fit the ANN's activations and the teacher is the ANN; ``blend`` in (0, 1) mixes the
two during fine-tuning (convert.finetune's ``blend`` schedule):

    out = blend * variant(q, k, v) + (1 - blend) * ECM form of softmax(scale q k^T) v
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from models.ecm import ExpectationCompensation, MaskedSpikeProduct, SpikeProduct
from models.neurons import BaseNeuron, IFNeuron, TernaryNeuron
from models.state import StatefulModule
from models.synapse import StepProduct

SPIKFORMER_SCALE = 0.125
VARIANTS = ("ecm", "psa", "ssa", "a2os2a")
ATTENTION_MAPS = ("row_max", "softmax")


class ChannelAffine(nn.Module):
    """x * gain + shift per channel (``gain``, ``shift``: [heads, 1, head_dim]; the identity until calibration
    fits them): maps a softmax-free attention's output onto the scale of the softmax attention it replaces.
    Linear, so the same at every step; one MAC per element per step in the energy count."""

    def __init__(self) -> None:
        super().__init__()
        self.out_gain: Optional[nn.Parameter]
        self.out_shift: Optional[nn.Parameter]
        self.register_parameter("out_gain", None)
        self.register_parameter("out_shift", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.out_gain is None else x * self.out_gain + self.out_shift


MASK_SCHEDULES = ("random", "even")
MASK_SEED_STRIDE = 1 << 20  # draw d of the masks seeds core c operand i with 3 c + i + d 2^20
MASK_OPERANDS = ("q", "k", "attn")


class SpikeMask(StatefulModule):
    """x * m(t), no rescaling. ``random``: m ~ Bernoulli(1 - p) at every step (EST). ``even``: element i is
    dropped at step t iff floor((t + 1) p + u_i) > floor(t p + u_i), u_i ~ U[0, 1) drawn once per simulation:
    a share p of its steps, evenly spaced (once in every 1/p steps), so the kept share of any window is
    within one step of 1 - p. Draws come from a generator seeded at ``reset``, so step and multi-step mode
    draw the same masks and every simulation repeats exactly."""

    def __init__(self, p: float, seed: int, schedule: str = "random") -> None:
        super().__init__()
        if schedule not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {schedule!r}: use one of {', '.join(MASK_SCHEDULES)}")
        self.p, self.seed, self.schedule = float(p), int(seed), schedule
        self.analog = False  # the identity while the network computes its ANN (calibration, reference)
        self.generator: Optional[torch.Generator] = None
        self.phase: Optional[torch.Tensor] = None
        self.t = 0

    def reset(self) -> None:
        self.generator, self.phase, self.t = None, None, 0

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != like.device:
            self.generator = torch.Generator(device=like.device).manual_seed(self.seed)
        if self.schedule == "random":
            keep = torch.rand(like.shape, generator=self.generator, device=like.device) >= self.p
        else:
            if self.phase is None:
                self.phase = torch.rand(like.shape, generator=self.generator, device=like.device,
                                        dtype=torch.float64)
            t, self.t = self.t, self.t + 1
            keep = torch.floor((t + 1) * self.p + self.phase) == torch.floor(t * self.p + self.phase)
        return keep.to(like.dtype)

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.analog else x * self._mask(x)

    def multi_step(self, x: torch.Tensor) -> torch.Tensor:
        if self.analog:
            return x
        xs = self.unfold(x)
        return self.fold(xs * torch.stack([self._mask(xs[t]) for t in range(xs.shape[0])]))

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, schedule={self.schedule}, {super().extra_repr()}"


def additive_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """SDPA's mask as an additive term: a boolean mask (True = attend) becomes 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))


def causal_mask(n_q: int, n_k: int, like: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=like.device).tril(diagonal=n_k - n_q)
    return additive_mask(keep, like)


def row_max_exp(s: torch.Tensor) -> torch.Tensor:
    """exp(s - max_k s): softmax(s) before its normalisation, 1 at each row's largest score."""
    return torch.exp(s - s.amax(-1, keepdim=True))


class FlooredDivision:
    """x / max(rows, floor): the division a RowNormalisation computes in expectation."""

    def __init__(self, floor: float) -> None:
        self.floor = float(floor)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x / rows.clamp_min(self.floor)

    def __repr__(self) -> str:
        return f"FlooredDivision(floor={self.floor})"


class RowNormalisation(nn.Module):
    """ECM((P V) / max(P 1, floor)) for the product stream P V and the map stream P (the row_max map): the row
    sums are additions of the map's spikes (one per non-zero element); the division is computed in expectation,
    like a softmax. In the ANN P's largest entry per row is 1, so P 1 >= 1, and a spiking row's largest entry
    alone sends about its threshold (near 1) at every step: the floor, half of that (times the share of the map
    a psa mask keeps), changes nothing in the ANN and keeps early steps' estimates from dividing by ~0."""

    def __init__(self, floor: float = 0.5) -> None:
        super().__init__()
        self.divide = ExpectationCompensation(FlooredDivision(floor), streams=(0, 1))

    def forward(self, out: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return self.divide(out, attn.sum(-1, keepdim=True))


class ValueCentring(nn.Module):
    """(1 - g A 1) mean_k(V) for an attention map stream A (scaled by ``gain`` g) and a value stream V, in
    expectation: one SpikeProduct of the row deficit [.., N, 1] and the keys' mean value [.., 1, d].

    Added to g A V it gives g A (V - c) + c, c = mean_k(V): A V itself where A's rows sum to 1. The reductions
    are additions of the spikes (one per non-zero element); the outer product is N d MACs per head and step."""

    def __init__(self) -> None:
        super().__init__()
        self.product = SpikeProduct()

    def forward(self, attn: torch.Tensor, v: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        row_sums = attn.sum(-1, keepdim=True)
        deficit = 1.0 - (row_sums * gain if gain != 1.0 else row_sums)
        return self.product(deficit, v.mean(-2, keepdim=True))


class SpikingSDPA(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` on
    spike streams, in one of the variants above."""

    def __init__(self, variant: str, make_neuron: Callable[[bool], BaseNeuron], fixed_tokens: bool = True,
                 mask_p: float = 0.0, seed: int = 0, constant: Tuple[bool, bool, bool] = (False, False, False),
                 mask_rescale: bool = False, mask_operands: Tuple[str, ...] = MASK_OPERANDS,
                 mask_schedule: str = "random", centre_values: bool = False,
                 attention_map: str = "row_max", mask_fanout: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown attention {variant!r}: use one of {', '.join(VARIANTS)}")
        if attention_map not in ATTENTION_MAPS:
            raise ValueError(f"unknown attention map {attention_map!r}: use one of {', '.join(ATTENTION_MAPS)}")
        self.variant = variant
        if variant in ("ecm", "psa"):
            # a constant operand (a learned query, as in attention pooling) needs no neuron: its product is linear
            self.q_neuron, self.k_neuron, self.v_neuron = (nn.Identity() if c else make_neuron(True) for c in constant)
            masked = [mask_p > 0 and name in mask_operands for name in MASK_OPERANDS]
            fanout = mask_fanout and any(masked)
            self.qk = MaskedSpikeProduct() if fanout and any(masked[:2]) else SpikeProduct()
            row_max = attention_map == "row_max"
            if row_max and centre_values:
                raise ValueError("value centring applies to the softmax attention map: the row_max map is "
                                 "normalised by its own row sums and loses no mass")
            self.softmax = ExpectationCompensation(row_max_exp if row_max else nn.Softmax(dim=-1))
            self.attn_neuron = make_neuron(row_max)  # row_max: signed, so that later steps can take back spikes
            # its last axis is the key position: per-key thresholds only where the token count is fixed
            self.attn_neuron.channelwise = fixed_tokens
            self.av = MaskedSpikeProduct() if fanout and masked[2] else SpikeProduct()
            self.q_mask, self.k_mask, self.attn_mask = (SpikeMask(mask_p, seed + i, mask_schedule) if m else
                                                        nn.Identity() for i, m in enumerate(masked))
            self.mask_gain = 1.0 / (1.0 - mask_p) if mask_rescale else 1.0  # per operand a mask is applied to
            # the floor: half a kept spike's share of the row sums (all of them where only fan-out is masked)
            floor = 0.5 * (1.0 - mask_p) if masked[2] and not fanout else 0.5
            self.normalise = RowNormalisation(floor) if row_max else None
            self.centring = ValueCentring() if centre_values else None
        elif variant == "ssa":
            self.q_neuron, self.k_neuron, self.v_neuron = IFNeuron(1), IFNeuron(1), IFNeuron(1)
            self.qk, self.av = StepProduct(), StepProduct()
        else:
            self.q_neuron, self.k_act, self.v_neuron = IFNeuron(1), nn.ReLU(), TernaryNeuron()
            self.qk, self.av = StepProduct(), StepProduct()
        if variant in ("ssa", "a2os2a"):  # the ANN's attention, in expectation: analog mode and the blend
            self.soft_qk, self.soft_av = SpikeProduct(), SpikeProduct()
            self.soft_softmax = ExpectationCompensation(nn.Softmax(dim=-1))
            self.blend = 1.0  # weight of the variant's output; the rest is the ANN's attention
            self.affine = ChannelAffine()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                enable_gqa: bool = False) -> torch.Tensor:
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if self.variant in ("ssa", "a2os2a"):
            if attn_mask is not None or is_causal:
                raise ValueError(f"attention={self.variant} has no softmax to take an attention mask (relative "
                                 f"position bias, shifted windows or causal mask): use attention=ecm or psa")
            if self.q_neuron.analog:  # the ANN; the neurons run only so that calibration sees their inputs
                self.q_neuron(q), self.v_neuron(v), self.k_neuron(k) if self.variant == "ssa" else None
                return self.softmax_attention(q, k, v, scale)
            if self.blend <= 0:
                return self.softmax_attention(q, k, v, scale)
            out = self.softmax_free_attention(q, k, v)
            if self.blend >= 1:
                return out
            return self.blend * out + (1 - self.blend) * self.softmax_attention(q, k, v, scale)
        q, k, v = self.q_neuron(q), self.k_neuron(k), self.v_neuron(v)
        gains = [self.mask_gain if isinstance(m, SpikeMask) and not m.analog else 1.0  # analog mode: the ANN
                 for m in (self.q_mask, self.k_mask, self.attn_mask)]
        if isinstance(self.qk, MaskedSpikeProduct):
            attn = self.qk(self.q_mask(q), self.k_mask(k).transpose(-2, -1), q, k.transpose(-2, -1),
                           *gains[:2]) * scale
        else:
            q, k = self.q_mask(q), self.k_mask(k)
            attn = self.qk(q, k.transpose(-2, -1)) * (scale * gains[0] * gains[1])
        if is_causal:
            attn = attn + causal_mask(q.shape[-2], k.shape[-2], attn)
        mask = additive_mask(attn_mask, attn)
        if mask is not None:
            attn = attn + mask
        attn = self.attn_neuron(self.softmax(attn))
        if isinstance(self.av, MaskedSpikeProduct):  # the map's sums keep every spike; the gain is the product's
            out, gains[2] = self.av(self.attn_mask(attn), v, attn, v, gains[2]), 1.0
        else:
            attn = self.attn_mask(attn)
            out = self.av(attn, v)
        if self.normalise is not None:  # a ratio: the map's mask rescaling cancels
            return self.normalise(out, attn)
        out = out * gains[2] if gains[2] != 1.0 else out
        if self.centring is None or self.attn_neuron.analog:  # analog: the rows sum to 1, nothing to centre
            return out
        return out + self.centring(attn, v, gains[2])

    def softmax_free_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ssa: 0.125 Q K^T V with binary Q, K, V; a2os2a: Q ReLU(k)^T V with binary Q, ternary V; every step;
        then the calibrated per-channel affine map."""
        if self.variant == "ssa":
            q, k, v = self.q_neuron(q), self.k_neuron(k), self.v_neuron(v)
            return self.affine(self.av(self.qk(q, k.transpose(-2, -1)), v) * SPIKFORMER_SCALE)
        q, k, v = self.q_neuron(q), self.k_act(k), self.v_neuron(v)
        return self.affine(self.av(self.qk(q, k.transpose(-2, -1)), v))

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(scale q k^T) v of the streams themselves, in expectation (exact in analog mode)."""
        return self.soft_av(self.soft_softmax(self.soft_qk(q, k.transpose(-2, -1)) * scale), v)

    def products(self) -> List[Tuple[nn.Module, Optional[BaseNeuron], Optional[BaseNeuron], bool]]:
        """(product, neuron of A or None, neuron of B or None, B transposed) for operation counting."""
        def spiking(n):
            return n if isinstance(n, BaseNeuron) else None
        if self.variant in ("ssa", "a2os2a"):
            soft = [(self.soft_qk, None, None, True), (self.soft_av, None, None, False)]  # analog mode, blend
            a = self.k_neuron if self.variant == "ssa" else None
            return [(self.qk, self.q_neuron, a, True), (self.av, None, self.v_neuron, False)] + soft
        centring = [] if self.centring is None else [(self.centring.product, None, None, False)]
        return [(self.qk, spiking(self.q_neuron), spiking(self.k_neuron), True),
                (self.av, self.attn_neuron, spiking(self.v_neuron), False)] + centring

    def extra_repr(self) -> str:
        if self.variant in ("ecm", "psa"):
            return f"variant={self.variant}, map={'row_max' if self.normalise is not None else 'softmax'}"
        return f"variant={self.variant}"
