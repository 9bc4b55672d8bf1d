"""Spiking neurons. Each works in units of its threshold theta:

    u <- leak * u + x / theta;  k = fire(u) (an integer level);  out = k * theta
    u <- u - k (reset by subtraction)   or   u <- 0 where k != 0 (hard reset)

The membrane starts at ``v_init`` * theta; v_init = 0.5 turns the truncation of
``floor`` into rounding (QCFS-style shift). ``analog = True`` makes a neuron the
identity (a non-negative neuron: max(x, 0)), the function the neuron converges to; the
network then computes the ANN exactly (used while calibrating).

Coding (``coding``): ``rate`` sends k at every step; ``differential`` sends only the change of the level,
k(t) - k(t-1), and the receiving layer keeps W k(t-1) theta and adds W (k(t) - k(t-1)) theta: the same
values reach the network, but a neuron whose level is steady sends nothing. ``hysteresis`` s makes levels
steady: the neuron keeps k(t-1) while its membrane after the reset stays within s of its usual range
([-s, 1 + s) for floor neurons, |u| < 1/2 + s for rounding ones) and otherwise changes it by the
smallest step that brings the membrane back (IF neurons; the multi-threshold neuron fires anew), so the
error of the running mean grows from theta / (2t) to (1/2 + s) theta / t; s = 0 gives exactly the
rate-coded outputs.

Training (fine-tuning over T): with a ``surrogate`` set and gradients enabled, the
forward value stays exactly k while the gradient is that of a smooth or linear
stand-in g(u) for the staircase k(u) (``k = fire(u) + g(u) - g(u).detach()``); the
reset uses k detached, so gradients flow through the membrane but not the reset. In multi-step
mode a neuron's T steps are one autograd Function (``NeuronSequence``) whose backward pass computes
these gradients in closed form.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from models import kernels
from models.state import StatefulModule
from models.tokens import token_rows


CODINGS = ("rate", "differential")
HYSTERESIS_MARGIN = 2.0 ** -12


class BaseNeuron(StatefulModule):
    """Shared state and dynamics; subclasses define ``fire`` and ``levels``."""

    leak: float = 1.0
    hard_reset: bool = False
    signed: bool = True
    zero_centre: float = 0.0  # the middle of the membrane values that fire nothing (1/2 for floor)

    def __init__(self, threshold: float = 1.0, v_init: float = 0.5) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)), requires_grad=False)
        self.v_init = float(v_init)
        self.analog = False
        self.channelwise = True  # a per-channel threshold is meaningful (the channel axis has a fixed size)
        self.channel_axis = -1  # the channel axis of the input: -1 (features last) or 1 (NCHW, before a Conv)
        self.surrogate: Optional[Surrogate] = None  # set while fine-tuning
        self.coding = "rate"
        self.hysteresis = 0.0
        self.u: Optional[torch.Tensor] = None
        self._theta: Optional[torch.Tensor] = None
        self._block: Optional[torch.Tensor] = None
        self.level: Optional[torch.Tensor] = None  # differential: k(t - 1)
        self._prior: Optional[torch.Tensor] = None  # differential: the previous output under the latest one

    def set_coding(self, coding: str, hysteresis: float = 0.0) -> None:
        if coding not in CODINGS:
            raise ValueError(f"unknown coding {coding!r}: use one of {', '.join(CODINGS)}")
        if coding == "differential" and (self.leak != 1.0 or self.hard_reset):
            raise ValueError(f"coding=differential needs a neuron without leak and with reset by subtraction; "
                             f"{type(self).__name__} has leak {self.leak} and "
                             f"{'hard' if self.hard_reset else 'soft'} reset: use neuron=signed_if, if or "
                             f"multi_threshold")
        if not hysteresis >= 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.coding, self.hysteresis = coding, float(hysteresis)
        self.reset()

    @property
    def max_level(self) -> int:
        """Largest |k| one step can emit: the neuron's range is max_level * theta per step."""
        return max(abs(k) for k in self.levels())

    def levels(self) -> List[int]:
        raise NotImplementedError

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def jumps(self) -> List[Tuple[float, float]]:
        """(position, height) of every step of the staircase k(u), in increasing position."""
        raise NotImplementedError

    def theta(self, like: torch.Tensor) -> torch.Tensor:
        """The threshold shaped to broadcast against ``like``: a scalar, per channel on ``channel_axis``, or
        [P + 1, C] rows for the P prefix tokens and the other tokens along the second to last axis."""
        theta = token_rows(self.threshold, like)
        if theta.dim() == 0 or self.channel_axis == -1 or self.threshold.dim() == 2:
            return theta
        return theta.reshape(-1, *([1] * (like.dim() - 1 - self.channel_axis)))

    def integer_levels(self, out: torch.Tensor) -> torch.Tensor:
        """The integer levels k of an output k theta."""
        return torch.round(out / self.theta(out))

    def sent(self, out: torch.Tensor) -> torch.Tensor:
        """What the latest output ``out`` = k theta sent per element: k (rate) or k(t) - k(t-1) (differential)."""
        if self.coding == "differential":
            if self._prior is None or self._prior.shape != out.shape:
                raise ValueError("sent() of a differential neuron takes the output of its latest call")
            out = out - self._prior
        return self.integer_levels(out)

    def events(self, out: torch.Tensor) -> torch.Tensor:
        """Events per element of the latest output: of what it sent."""
        return self.count(self.sent(out))

    def count(self, k: torch.Tensor) -> torch.Tensor:
        """Events of integer levels k: one per unit of |k|."""
        return k.abs()

    def reset(self) -> None:
        self.u = None
        self._theta = None  # the threshold shaped for this sequence's inputs, computed at its first step
        self._block = None  # the same for the fused kernel (models.kernels.theta_block)
        self.level = None
        self._prior = None

    def _integrate(self, u: Optional[torch.Tensor], x: torch.Tensor, theta: torch.Tensor,
                   pre: Optional[torch.Tensor] = None):
        """One step: u <- leak * u + x / theta; returns the new membrane and the integer levels k.

        Without autograd it runs in place on ``u`` (which the neuron owns) with fused updates: the same
        operations in the same order (addcdiv is u + x / theta), so bitwise the same values, without
        temporaries; ``pre`` (in place only) receives the membrane before the reset."""
        inplace = not torch.is_grad_enabled()
        if u is None:
            u = (x / theta).add_(self.v_init) if inplace else x / theta + self.v_init
        elif inplace:
            u = (u.mul_(self.leak) if self.leak != 1.0 else u).addcdiv_(x, theta)
        else:
            u = (u * self.leak if self.leak != 1.0 else u) + x / theta
        k, k_reset = self._levels(u)
        if pre is not None:
            pre.copy_(u)
        if inplace:
            u = u.masked_fill_(k_reset != 0, 0.0) if self.hard_reset else u.sub_(k_reset)
        else:
            u = torch.where(k_reset != 0, torch.zeros_like(u), u) if self.hard_reset else u - k_reset
        return u, k

    def _levels(self, u: torch.Tensor):
        """(k, k without the surrogate's gradient): k = fire(u), and while training k + g(u) - g(u).detach().

        Differential coding with hysteresis s: ``hold``."""
        if self.hysteresis > 0 and self.level is not None:
            # the bound sits just inside 1/2 + s: membranes exactly on it (half-integers, common after exact-zero
            # inputs) would otherwise turn on float rounding, which differs between step and multi-step mode
            k = self.hold(u, self.level, 0.5 + self.hysteresis - HYSTERESIS_MARGIN)
        else:
            k = self.fire(u)
        if self.coding == "differential":
            self.level = k.detach()
        if self.surrogate is not None and torch.is_grad_enabled():
            g = self.surrogate(u, self.jumps())
            return k + (g - g.detach()), k
        return k, k

    def hold(self, u: torch.Tensor, level: torch.Tensor, band: float) -> torch.Tensor:
        """k(t-1) while the residual u - k(t-1) lies within ``band`` of the middle of the membrane values that
        fire nothing; otherwise fire(u)."""
        return torch.where((u - level - self.zero_centre).abs() < band, level, self.fire(u))

    def fused_range(self, x: torch.Tensor, steps: int = 1) -> Optional[Tuple[int, int]]:
        """(lo, hi) of k = clamp(floor(u), lo, hi) where the fused kernel (models.kernels) runs ``steps`` steps of
        this neuron's update on inputs like ``x`` (one step's), else None."""
        return None

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        if self.analog:
            return x if self.signed else torch.clamp(x, min=0)
        if self._theta is None:  # first step of a sequence
            theta = self.theta(x)  # a view of the threshold Parameter, which an attribute would register as one
            self._theta = theta.view_as(theta) if isinstance(theta, nn.Parameter) else theta
        theta = self._theta
        fused = self.fused_range(x)
        if fused is not None:
            if self._block is None:
                self._block = kernels.theta_block(theta, x.shape)
            out, self.u = kernels.if_sequence(x.unsqueeze(0), self.u, self._block, self.v_init, *fused)
            return out[0]
        if self.coding == "differential":  # k is kept as the next step's level: not scaled in place
            self._prior = torch.zeros_like(x) if self.level is None else self.level * theta
            self.u, k = self._integrate(self.u, x, theta)
            return k * theta
        self.u, k = self._integrate(self.u, x, theta)
        return k * theta if torch.is_grad_enabled() else k.mul_(theta)

    def run_sequence(self, xs: torch.Tensor, theta: torch.Tensor, pre: Optional[torch.Tensor] = None,
                     u: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The steps of unfolded inputs ``xs`` [T, B, ...] from membrane ``u`` (None: reset), without autograd:
        every step writes k * theta straight into its slice of the output (``pre``: see ``_integrate``).
        Returns the outputs and the final membrane."""
        fused = None if pre is not None else self.fused_range(xs[0], xs.shape[0])
        if fused is not None:
            return kernels.if_sequence(xs, u, kernels.theta_block(theta, xs.shape[1:]), self.v_init, *fused)
        out = torch.empty_like(xs)
        for t in range(xs.shape[0]):
            u, k = self._integrate(u, xs[t], theta, None if pre is None else pre[t])
            torch.mul(k, theta, out=out[t])
        return out, u

    def multi_step(self, x: torch.Tensor) -> torch.Tensor:
        if self.analog:
            return self.single_step(x)
        theta = self.theta(x)
        xs = self.unfold(x)
        carry = self.carried()
        if not carry:  # this call covers steps 1..T from a reset state
            self.u, self.level = None, None
        prior = None if self.level is None else self.level * theta  # differential: the previous call's output
        if torch.is_grad_enabled() and (x.requires_grad or theta.requires_grad):
            out = NeuronSequence.apply(xs, theta, self)
        else:
            with torch.no_grad():
                out, u = self.run_sequence(xs, theta, u=self.u)
            self.u = u if carry else None
        if self.coding == "differential":  # the previous step's output under each step's, for sent()
            first = torch.zeros_like(out[:1]) if prior is None else prior.expand_as(out[:1])
            self._prior = self.fold(torch.cat([first, out[:-1].detach()]))
            if not carry:
                self.level = None
        return self.fold(out)

    def extra_repr(self) -> str:
        coding = ", coding=differential" if self.coding == "differential" else ""
        return f"levels={self.levels()}, v_init={self.v_init}{coding}, {super().extra_repr()}"


class IFNeuron(BaseNeuron):
    """Integrate-and-fire, k = clamp(floor(u), 0, L): binary for L = 1, one event per unit of k."""

    signed = False
    zero_centre = 0.5

    def __init__(self, levels: int = 1, threshold: float = 1.0, v_init: float = 0.5) -> None:
        super().__init__(threshold, v_init)
        if int(levels) < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.num_levels = int(levels)

    def levels(self) -> List[int]:
        low = -self.num_levels if self.signed else 0
        return list(range(low, self.num_levels + 1))

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        return torch.floor(u).clamp_(-self.num_levels if self.signed else 0, self.num_levels)

    def fused_range(self, x: torch.Tensor, steps: int = 1) -> Optional[Tuple[int, int]]:
        """Rate coding, no leak, reset by subtraction, a threshold of the input's dtype, and where
        ``kernels.usable``."""
        if (self.coding != "rate" or self.leak != 1.0 or self.hard_reset or self.threshold.dtype != x.dtype
                or not kernels.usable(x, steps)):
            return None
        return -self.num_levels if self.signed else 0, self.num_levels

    def hold(self, u: torch.Tensor, level: torch.Tensor, band: float) -> torch.Tensor:
        """The level nearest k(t-1) that leaves the residual within ``band`` of 1/2 (k(t-1) itself while it
        does): the smallest change of level, so a drifting input moves the level one step at a time."""
        excess = u - level - self.zero_centre
        up = torch.floor(excess - band) + 1  # the smallest d with excess - d < band
        down = torch.ceil(excess + band) - 1  # the largest d with excess - d > -band
        change = torch.where(excess >= band, up, torch.where(excess <= -band, down, torch.zeros_like(excess)))
        return (level + change).clamp_(-self.num_levels if self.signed else 0, self.num_levels)

    def jumps(self) -> List[Tuple[float, float]]:
        """floor steps up by one at every integer from the lowest level + 1 to L."""
        return [(float(k + 1), 1.0) for k in self.levels()[:-1]]


class SignedIFNeuron(IFNeuron):
    """Signed integrate-and-fire, k = clamp(floor(u), -L, L); L = 1 gives k in {-1, 0, 1}."""

    signed = True


class MultiThresholdNeuron(BaseNeuron):
    """ECMT's multi-threshold neuron: at most one event per step, of value +-theta * 2^j, j in 0..N-1.

    j is the largest level with |u| >= 2^j - 1/2 (nothing fires below |u| = 1/2).
    """

    def __init__(self, levels: int = 8, threshold: float = 1.0, v_init: float = 0.0, signed: bool = True) -> None:
        super().__init__(threshold, v_init)
        if not 1 <= int(levels) <= 30:
            raise ValueError(f"multi-threshold levels must be in 1..30, got {levels}")
        self.num_levels = int(levels)
        self.signed = signed

    def levels(self) -> List[int]:
        pos = [2 ** j for j in range(self.num_levels)]
        return sorted(([-p for p in pos] if self.signed else []) + [0] + pos)

    def count(self, k: torch.Tensor) -> torch.Tensor:
        """One graded event per non-zero spike."""
        return (k != 0).to(k.dtype)

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        mag = u.abs() if self.signed else torch.clamp(u, min=0)
        j = torch.clamp(torch.frexp(mag + 0.5).exponent - 1, 0, self.num_levels - 1)  # floor(log2(mag + 1/2))
        k = torch.where(mag >= 0.5, torch.exp2(j.to(u.dtype)), torch.zeros_like(u))
        return torch.sign(u) * k if self.signed else k

    def jumps(self) -> List[Tuple[float, float]]:
        """0 -> 1 at 1/2, then 2^(j-1) -> 2^j at 2^j - 1/2 (mirrored below zero when signed)."""
        pos = [(0.5, 1.0)] + [(2.0 ** j - 0.5, 2.0 ** (j - 1)) for j in range(1, self.num_levels)]
        return ([(-p, h) for p, h in reversed(pos)] if self.signed else []) + pos


class TernaryNeuron(BaseNeuron):
    """A2OS2A's ternary neuron: u <- 0.25 u + x / theta; k = sign(u) where |u| >= 1/2; hard reset."""

    leak = 0.25
    hard_reset = True

    def __init__(self, levels: int = 1, threshold: float = 1.0, v_init: float = 0.0) -> None:
        super().__init__(threshold, v_init)
        if int(levels) != 1:
            raise ValueError(f"the ternary neuron has exactly one level (k in {{-1, 0, 1}}), got levels={levels}")

    def levels(self) -> List[int]:
        return [-1, 0, 1]

    def fire(self, u: torch.Tensor) -> torch.Tensor:
        return torch.where(u.abs() >= 0.5, torch.sign(u), torch.zeros_like(u))

    def jumps(self) -> List[Tuple[float, float]]:
        return [(-0.5, 1.0), (0.5, 1.0)]


class NeuronSequence(torch.autograd.Function):
    """A neuron's T steps with the backward pass through time in closed form (fine-tuning in multi-step mode).

    The forward pass is the in-place simulation, keeping only the membranes u(t) before each reset. With
    G(t) = dL/dout(t), g the surrogate and m(t) = 1 (reset by subtraction) or [k(t) = 0] (hard reset):

        d(t) = dL/du(t) = G(t) theta g'(u(t)) + leak m(t) d(t + 1)
        dL/dx(t) = d(t) / theta,   dL/dtheta = sum_t (G(t) out(t) - dL/dx(t) x(t)) / theta

    which is what autograd computes through the step-by-step graph (k = fire(u) + g(u) - g(u).detach(),
    the reset with k detached, out = k theta), without its per-step temporaries."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, theta: torch.Tensor, neuron: "BaseNeuron") -> torch.Tensor:
        pre = torch.empty_like(xs)
        out, _ = neuron.run_sequence(xs, theta, pre)
        ctx.neuron = neuron
        ctx.save_for_backward(xs, theta, pre, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xs, theta, pre, out = ctx.saved_tensors
        neuron = ctx.neuron
        jumps = neuron.jumps()
        grad_x = torch.empty_like(xs)
        acc = torch.zeros_like(xs[0]) if ctx.needs_input_grad[1] else None  # sum_t G out - dL/dx x
        for t in range(xs.shape[0] - 1, -1, -1):  # one step at a time: its tensors stay in cache
            d = torch.mul(grad_out[t], theta, out=grad_x[t])
            if neuron.surrogate is None:  # the staircase alone: no gradient through the membrane
                d.zero_()
            else:
                neuron.surrogate.scale_by_slope(d, pre[t], jumps)
            if t + 1 < xs.shape[0]:  # d(t + 1), then dL/dx(t + 1) = d(t + 1) / theta
                later = grad_x[t + 1]
                if neuron.hard_reset:
                    d.addcmul_(later, out[t] == 0, value=neuron.leak)
                else:
                    d.add_(later, alpha=neuron.leak)
                _finish_step(later, theta, grad_out[t + 1], out[t + 1], xs[t + 1], acc)
        _finish_step(grad_x[0], theta, grad_out[0], out[0], xs[0], acc)
        grad_theta = None if acc is None else acc.sum_to_size(theta.shape) / theta
        return grad_x, grad_theta, None


def _finish_step(d: torch.Tensor, theta: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                 acc: Optional[torch.Tensor]) -> None:
    """d(t) -> dL/dx(t) = d(t) / theta in place; acc += G(t) out(t) - dL/dx(t) x(t)."""
    d.div_(theta)
    if acc is not None:
        acc.addcmul_(grad_out, out).addcmul_(d, x, value=-1)


class Surrogate:
    """The stand-in g(u) whose gradient replaces the staircase's, built from its (position, height) steps.

    ``ste``: g = clamp(u, first - h_first, last + h_last) (straight-through inside the neuron's range);
    ``sigmoid``: g = sum_j h_j sigmoid(alpha (u - c_j)), a smoothed staircase.
    """

    KINDS = ("ste", "sigmoid")

    def __init__(self, kind: str = "ste", alpha: float = 4.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown surrogate {kind!r}: use one of {', '.join(self.KINDS)}")
        if not alpha > 0:
            raise ValueError(f"surrogate alpha must be positive, got {alpha}")
        self.kind, self.alpha = kind, float(alpha)

    def __call__(self, u: torch.Tensor, jumps: List[Tuple[float, float]]) -> torch.Tensor:
        if self.kind == "ste":
            return torch.clamp(u, *self.ste_range(jumps))
        return sum(h * torch.sigmoid(self.alpha * (u - c)) for c, h in jumps)

    @staticmethod
    def ste_range(jumps: List[Tuple[float, float]]) -> Tuple[float, float]:
        """Where ``ste``'s g(u) = u: one step's height beyond the first and the last jump."""
        (first, h_first), (last, h_last) = jumps[0], jumps[-1]
        return first - h_first, last + h_last

    def scale_by_slope(self, d: torch.Tensor, u: torch.Tensor, jumps: List[Tuple[float, float]]) -> torch.Tensor:
        """d * g'(u) in place: g' = 1 inside the neuron's range, else 0 (``ste``), or
        sum_j h_j alpha s_j (1 - s_j) with s_j = sigmoid(alpha (u - c_j)) (``sigmoid``)."""
        if self.kind == "ste":
            low, high = self.ste_range(jumps)
            return d.masked_fill_(torch.lt(u, low).logical_or_(u > high), 0.0)
        slope = torch.zeros_like(u)
        for c, h in jumps:
            s = torch.sigmoid(self.alpha * (u - c))
            slope += h * self.alpha * s * (1 - s)
        return d.mul_(slope)


NEURONS = {
    "signed_if": SignedIFNeuron,
    "if": IFNeuron,
    "multi_threshold": MultiThresholdNeuron,
    "ternary": TernaryNeuron,
}


def set_coding(net: nn.Module, coding: str, hysteresis: float = 0.0) -> None:
    """Put every neuron of ``net`` in ``coding`` (rate or differential, with ``hysteresis``)."""
    for m in net.modules():
        if isinstance(m, BaseNeuron):
            m.set_coding(coding, hysteresis)


def create_neuron(name: str, signed: bool = True, **kwargs) -> BaseNeuron:
    """A neuron by config name. ``signed=False`` asks for the non-negative variant where one exists
    (signed_if -> if, multi_threshold -> unsigned multi_threshold)."""
    if name not in NEURONS:
        raise ValueError(f"unknown neuron {name!r}: use one of {', '.join(NEURONS)}")
    if name == "signed_if" and not signed:
        name = "if"
    if name == "multi_threshold":
        kwargs["signed"] = signed
    return NEURONS[name](**kwargs)
