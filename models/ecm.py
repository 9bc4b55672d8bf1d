"""Expectation compensation (after ECMT): non-linear functions and products computed in expectation.

With S(t) = x(1) + ... + x(t) and m(t) = S(t) / t:

    ExpectationCompensation(f):  o(t) = t f(m(t)) - (t-1) f(m(t-1))
    SpikeProduct (A @ B):        o(t) = S_A(t) S_B(t) / t - S_A(t-1) S_B(t-1) / (t-1)

so the outputs up to t sum to t f(m(t)) (resp. t m_A(t) m_B(t)): the running mean of
the output is f (resp. the product) of the running means of the inputs. At t = 1
both are exactly f(x) and A @ B. The product's increment expands into spike-driven
terms a(t) S_B(t-1) + S_A(t-1) b(t) + a(t) b(t), minus a rescaling of the previous
product; it is computed here in the equivalent closed form.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.state import StatefulModule


class ExpectationCompensation(StatefulModule):
    """o(t) = t f(m(t)) - (t-1) f(m(t-1)) for any stateless module f (LayerNorm, GELU, softmax, ...)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.sum: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None  # t f(m(t)) of the previous step

    def single_step(self, x: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.sum = x if self.sum is None else self.sum + x
        total = self.fn(self.sum / self.t) * self.t
        out = total if self.total is None else total - self.total
        self.total = total
        return out

    def multi_step(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.unfold(x)
        t = self.step_index(xs)
        sums = torch.cumsum(xs, dim=0)
        totals = self.unfold(self.fn(self.fold(sums / t))) * t  # not in place: softmax's backward needs its output
        out = totals.clone()
        out[1:] -= totals[:-1]
        return self.fold(out)


class SpikeProduct(StatefulModule):
    """The product A @ B of two spike streams in expectation: mean output = m_A @ m_B."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.sum_a: Optional[torch.Tensor] = None
        self.sum_b: Optional[torch.Tensor] = None
        self.prev: Optional[torch.Tensor] = None  # S_A S_B / t of the previous step

    def single_step(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.sum_a = a if self.sum_a is None else self.sum_a + a
        self.sum_b = b if self.sum_b is None else self.sum_b + b
        cur = (self.sum_a @ self.sum_b) / self.t
        out = cur if self.prev is None else cur - self.prev
        self.prev = cur
        return out

    def multi_step(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sa = torch.cumsum(self.unfold(a), dim=0)
        sb = torch.cumsum(self.unfold(b), dim=0)
        cur = (sa @ sb).div_(self.step_index(sa))
        out = cur.clone()
        out[1:] -= cur[:-1]
        return self.fold(out)
