"""Expectation compensation (after ECMT): non-linear functions and products computed in expectation.

With S(t) = x(1) + ... + x(t) and m(t) = S(t) / t:

    ExpectationCompensation(f):  o(t) = t f(m(t)) - (t-1) f(m(t-1))
    SpikeProduct (A op B):       o(t) = op(S_A(t), S_B(t)) / t - op(S_A(t-1), S_B(t-1)) / (t-1)

so the outputs up to t sum to t f(m(t)) (resp. t op(m_A(t), m_B(t))): the running mean
of the output is f (resp. the product) of the running means of the inputs. f may take
several streams (``streams``: their positions among the arguments; every other argument
is a constant passed through). ``op`` is any bilinear operation (matmul, element-wise
product, einsum). At t = 1 both are exactly f(x) and op(A, B). The product's increment
expands into spike-driven terms a(t) S_B(t-1) + S_A(t-1) b(t) + a(t) b(t), minus a
rescaling of the previous product; it is computed here in the equivalent closed form.
MaskedSpikeProduct (psa's fan-out masks) sums the increments instead, each from the kept events only.

Without autograd on CPU float32 tensors the running means and the step differences run in fused C loops
(models.native: one pass each instead of two), bitwise the eager path's values: over all steps of a multi-step
call, and in step mode one step at a time with the sums and the previous total updated in place.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from models import kernels, native
from models.state import StatefulModule


def _accumulate(total: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """total + x; in place (on an owned copy) unless autograd needs the previous total."""
    if total is None:  # owned: a later in-place change of the input must not reach the sum; contiguous, so that
        return x.clone(memory_format=torch.contiguous_format)  # a product of sums (matmul) copies none per step
    return total + x if torch.is_grad_enabled() and (total.requires_grad or x.requires_grad) else total.add_(x)


def _map(fn, out):
    return tuple(fn(o) for o in out) if isinstance(out, (tuple, list)) else fn(out)


# Without autograd the helpers below work in place on tensors the module owns (fresh results of its own
# operations): the same operations in the same order as the out-of-place forms, so bitwise the same values.

def _scaled(y: torch.Tensor, t) -> torch.Tensor:
    """y * t."""
    return y * t if torch.is_grad_enabled() else y.mul_(t)


def _divided(y: torch.Tensor, t) -> torch.Tensor:
    """y / t."""
    return y / t if torch.is_grad_enabled() else y.div_(t)


def _difference(cur: torch.Tensor, prev: torch.Tensor, reuse: bool) -> torch.Tensor:
    """cur - prev, written over ``prev`` when ``reuse`` says no caller holds it."""
    return torch.sub(cur, prev, out=prev) if reuse and not torch.is_grad_enabled() else cur - prev


def _running_sums(xs: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, B, ...] -> S(t) = S(t - 1) + x(t), S(0) = ``before`` (a carried sum) or 0: one float addition per step,
    in step mode's order, so the sums are bitwise step mode's (torch.cumsum accumulates in double on the CPU,
    which rounds differently, and is slower along the leading axis). Under autograd: ``RunningSums``."""
    if torch.is_grad_enabled() and (xs.requires_grad or (before is not None and before.requires_grad)):
        return RunningSums.apply(xs, before)
    sums = torch.empty(xs.shape, dtype=xs.dtype, device=xs.device)
    if before is None:
        sums[0].copy_(xs[0])
    else:
        torch.add(xs[0], before, out=sums[0])
    for t in range(1, sums.shape[0]):
        torch.add(sums[t - 1], xs[t], out=sums[t])
    return sums


class RunningSums(torch.autograd.Function):
    """``_running_sums`` with its gradient in closed form: dL/dx(t) = sum_{s >= t} dL/dS(s) (a running sum from
    the last step back), dL/dS(0) = dL/dx(1)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, before: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.carried = before is not None
        with torch.no_grad():
            return _running_sums(xs, before)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        for t in range(grad.shape[0] - 2, -1, -1):
            grad[t].add_(grad[t + 1])
        return grad, (grad[0].clone() if ctx.carried else None)


def _step_differences(totals: torch.Tensor, before=None) -> torch.Tensor:
    """[T, B, ...] totals -> the increments totals[t] - totals[t - 1], the first row minus ``before`` (a carried
    total; None: the first row kept)."""
    if torch.is_grad_enabled():  # not in place: softmax's backward needs its output
        diff = totals.clone()
        diff[1:].sub_(totals[:-1])
        return diff
    for i in range(totals.shape[0] - 1, 0, -1):  # last row first, so every row subtracts an unchanged one
        totals[i].sub_(totals[i - 1])
    if before is not None:
        totals[0].sub_(before)
    return totals


def _running(xs: torch.Tensor, before: Optional[torch.Tensor], t: Optional[torch.Tensor], t0: int, divide: bool,
             keep_last: bool):
    """(S(t), or S(t) / t with ``divide``, for the steps of ``xs`` [T, B, ...] from the carried sum ``before``;
    S(T) where ``keep_last``): one pass of the C kernel where it runs (models.native), else the running sums
    then the division."""
    if kernels.cpu_usable(xs):
        return native.running_sums(xs, before, t0, divide=divide, keep_last=keep_last)
    sums = _running_sums(xs, before)
    last = sums[-1].clone() if keep_last else None  # before the division overwrites it
    return (_divided(sums, t) if divide else sums), last


def _compensated(totals: torch.Tensor, before: Optional[torch.Tensor], t: torch.Tensor, t0: int,
                 divide: bool) -> torch.Tensor:
    """The increments z(t) - z(t-1) of z(t) = totals(t) * t (or / t with ``divide``) after the carried z
    ``before``: one in-place pass of the C kernel where it runs, else the scaling then ``_step_differences``."""
    if kernels.cpu_usable(totals):
        return native.step_differences(totals, before, t0, divide)
    return _step_differences(_divided(totals, t) if divide else _scaled(totals, t), before)


def _kept_in_place(total: Optional[torch.Tensor], like: torch.Tensor) -> bool:
    """Whether a one-step kernel runs on ``like`` and can keep its carried ``total`` (None: a first step) in place."""
    return kernels.cpu_usable(like) and (total is None or native.holds_one_step(total, like.shape))


def _mean_step(x: torch.Tensor, total: Optional[torch.Tensor], t: int):
    """(S(t) / t, S(t)) with S(t) = ``total`` + x (S(1) = x): one pass of the C kernel, with the sum kept in
    ``total``'s place, where it runs."""
    if _kept_in_place(total, x):
        means, total = native.running_sums(x.unsqueeze(0), total, t - 1, divide=True, keep_last=True, last=total)
        return means[0], total
    total = _accumulate(total, x)
    return total / t, total


def _compensated_step(y: torch.Tensor, total: Optional[torch.Tensor], t: int, divide: bool):
    """(z(t) - ``total``, z(t)) with z(t) = y t (or y / t with ``divide``) and ``total`` = z(t-1) (None at t = 1:
    z(1) itself): one pass of the C kernel, with z(t) kept in ``total``'s place, where it runs."""
    if _kept_in_place(total, y):
        keep = torch.empty(y.shape, dtype=y.dtype) if total is None else total
        return native.step_differences(y.unsqueeze(0), total, t - 1, divide, last=keep)[0], keep
    z = _divided(y, t) if divide else _scaled(y, t)
    return (z if total is None else _difference(z, total, reuse=t > 2)), z


class Method:
    """``Method("softmax")(x, -1)`` is ``x.softmax(-1)``: a traced tensor method as a plain callable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, x, *args, **kwargs):
        return getattr(x, self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tensor.{self.name}"


class ExpectationCompensation(StatefulModule):
    """o(t) = t f(m(t)) - (t-1) f(m(t-1)) for a stateless f (LayerNorm, GELU, softmax, F.normalize, ...).

    ``streams``: positions of the arguments that are spike/activation streams (the others are constants)."""

    def __init__(self, fn: Callable, streams: Sequence[int] = (0,)) -> None:
        super().__init__()
        self.fn = fn
        self.streams = tuple(streams)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.sums: Optional[List[torch.Tensor]] = None
        self.total = None  # t f(m(t)) of the previous step

    def _means(self, args, means):
        args = list(args)
        for i, m in zip(self.streams, means):
            args[i] = m
        return args

    def single_step(self, *args, **kwargs):
        self.t += 1
        t = self.t
        means, self.sums = zip(*(_mean_step(args[i], s, t)
                                 for s, i in zip(self.sums or [None] * len(self.streams), self.streams)))
        y = self.fn(*self._means(args, means), **kwargs)
        if isinstance(y, tuple):
            out, self.total = zip(*(_compensated_step(a, b, t, divide=False)
                                    for a, b in zip(y, self.total or [None] * len(y))))
            return tuple(out)
        out, self.total = _compensated_step(y, self.total, t, divide=False)
        return out

    def multi_step(self, *args, **kwargs):
        if not self.carried():
            self.reset()
        t0 = self.t
        first = self.unfold(args[self.streams[0]])
        t = self.step_index(first) + t0
        means, last_sums = zip(*(_running(self.unfold(args[i]), s, t, t0, divide=True, keep_last=self.carry)
                                 for i, s in zip(self.streams, self.sums or [None] * len(self.streams))))
        out = self.fn(*self._means(args, [self.fold(m) for m in means]), **kwargs)
        before = self.total
        if self.carry:  # the state a next call continues from: the last step's sums and total
            self.t, self.sums = t0 + first.shape[0], list(last_sums)
            self.total = _map(lambda y: self.unfold(y)[-1] * (t0 + first.shape[0]), out)
        if isinstance(out, tuple):
            return tuple(self._increments(y, b, t0) for y, b in zip(out, before or [None] * len(out)))
        return self._increments(out, before, t0)

    def _increments(self, y: torch.Tensor, before: Optional[torch.Tensor], t0: int) -> torch.Tensor:
        """t f(m(t)) - (t-1) f(m(t-1)) from the outputs f(m(t)) of a call (folded) and the carried total."""
        y = self.unfold(y)
        return self.fold(_compensated(y, before, self.step_index(y) + t0, t0, divide=False))

    def extra_repr(self) -> str:
        fn = "" if isinstance(self.fn, nn.Module) else f"fn={self.fn!r}, "
        return f"{fn}streams={self.streams}, {super().extra_repr()}"


class SpikeProduct(StatefulModule):
    """A bilinear product ``op(A, B)`` of two streams in expectation: mean output = op(m_A, m_B)."""

    def __init__(self, op: Callable = torch.matmul) -> None:
        super().__init__()
        self.op = op
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.sum_a: Optional[torch.Tensor] = None
        self.sum_b: Optional[torch.Tensor] = None
        self.prev: Optional[torch.Tensor] = None  # op(S_A, S_B) / t of the previous step

    def single_step(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.sum_a = _accumulate(self.sum_a, a)
        self.sum_b = _accumulate(self.sum_b, b)
        out, self.prev = _compensated_step(self.op(self.sum_a, self.sum_b), self.prev, self.t, divide=True)
        return out

    def multi_step(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.carried():
            self.reset()
        sa = _running(self.unfold(a), self.sum_a, None, 0, divide=False, keep_last=False)[0]
        sb = _running(self.unfold(b), self.sum_b, None, 0, divide=False, keep_last=False)[0]
        products = self.unfold(self.op(self.fold(sa), self.fold(sb)))
        t0, before = self.t, self.prev
        if self.carry:  # the state a next call continues from
            self.t, self.sum_a, self.sum_b = t0 + products.shape[0], sa[-1].clone(), sb[-1].clone()
            self.prev = products[-1] / self.t
        out = _compensated(products, before, self.step_index(products) + t0, t0, divide=True)
        return self.fold(out)

    def extra_repr(self) -> str:
        return f"op={getattr(self.op, '__name__', self.op)!r}, {super().extra_repr()}"


class MaskedSpikeProduct(SpikeProduct):
    """``op(A, B)`` in expectation with some events' fan-out skipped: ``forward(kept_a, kept_b, a, b, gain_a,
    gain_b)`` for the full streams a, b and their kept events (a mask's survivors; the stream itself where
    unmasked). The running sums keep every event, only the spike-driven increments use the kept ones:

        P(t) = P(t-1) + gain_a op(kept_a(t), S_B(t)) + gain_b op(S_A(t-1), kept_b(t)),   P(0) = 0
        o(t) = P(t) / t - P(t-1) / (t-1)

    With all events kept and unit gains P(t) = op(S_A(t), S_B(t)): SpikeProduct. A skipped event costs its
    increment at one step only (it stays in S_A for every later step), where a dropped one (a mask before the
    product) is missing from every later product; ``gain`` = 1 / (1 - p) for a mask keeping 1 - p of the events
    makes the increments unbiased."""

    def reset(self) -> None:
        super().reset()
        self.total: Optional[torch.Tensor] = None  # P(t)

    def single_step(self, kept_a: torch.Tensor, kept_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    gain_a: float = 1.0, gain_b: float = 1.0) -> torch.Tensor:
        self.t += 1
        from_b = None if self.sum_a is None else self.op(self.sum_a, kept_b)  # S_A(t-1), before it takes a(t)
        self.sum_a = _accumulate(self.sum_a, a)
        self.sum_b = _accumulate(self.sum_b, b)
        increment = _scaled(self.op(kept_a, self.sum_b), gain_a)
        if from_b is not None:
            increment = increment + _scaled(from_b, gain_b)
        self.total = _accumulate(self.total, increment)
        out, self.prev = _compensated_step(self.total.clone(), self.prev, self.t, divide=True)
        return out

    def multi_step(self, kept_a: torch.Tensor, kept_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   gain_a: float = 1.0, gain_b: float = 1.0) -> torch.Tensor:
        if not self.carried():
            self.reset()
        sa = _running(self.unfold(a), self.sum_a, None, 0, divide=False, keep_last=False)[0]
        sb = _running(self.unfold(b), self.sum_b, None, 0, divide=False, keep_last=False)[0]
        before_a = torch.zeros_like(sa[:1]) if self.sum_a is None else self.sum_a.unsqueeze(0)
        increments = self.unfold(_scaled(self.op(kept_a, self.fold(sb)), gain_a))
        increments = increments + self.unfold(_scaled(self.op(self.fold(torch.cat([before_a, sa[:-1]])), kept_b),
                                                      gain_b))
        totals = _running_sums(increments, self.total)
        t0, before = self.t, self.prev
        if self.carry:  # the state a next call continues from
            self.t, self.sum_a, self.sum_b = t0 + totals.shape[0], sa[-1].clone(), sb[-1].clone()
            self.total = totals[-1].clone()
            self.prev = totals[-1] / self.t
        return self.fold(_compensated(totals, before, self.step_index(totals) + t0, t0, divide=True))
