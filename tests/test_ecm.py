import contextlib
import inspect

import pytest
import timm.layers
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from convert.rewrite import ACTIVATIONS
from models import kernels
from models.ecm import ExpectationCompensation, MaskedSpikeProduct, SpikeProduct, _accumulate, _running_sums
from models.state import reset_net, set_step_mode

FUNCTIONS = {
    "layernorm": lambda: nn.LayerNorm(6, eps=1e-6),
    "rmsnorm": lambda: timm.layers.RmsNorm(6),
    "softmax": lambda: nn.Softmax(dim=-1),
    **{cls.__name__: cls for cls in ACTIVATIONS
       if not inspect.signature(cls).parameters or all(
           p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in inspect.signature(cls).parameters.values())},
}


def _randomise(fn):
    with torch.no_grad():
        for p in fn.parameters():
            p.normal_()
    return fn


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_running_mean_is_f_of_running_mean(name):
    fn = _randomise(FUNCTIONS[name]())
    ecm = ExpectationCompensation(fn)
    torch.manual_seed(0)
    T = 9
    xs = torch.randn(T, 4, 6) * 3
    outs = torch.stack([ecm(x) for x in xs])
    t = torch.arange(1, T + 1).reshape(-1, 1, 1)
    mean_out = torch.cumsum(outs, 0) / t
    expected = torch.stack([fn(m) for m in torch.cumsum(xs, 0) / t])
    assert torch.allclose(mean_out, expected, atol=1e-5, rtol=1e-5)
    reset_net(ecm)
    set_step_mode(ecm, "m", T)
    multi = ecm(xs.reshape(T * 4, 6)).reshape(outs.shape)
    assert torch.allclose(multi, outs, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 10), b=st.integers(1, 3), n=st.integers(1, 5), d=st.integers(1, 4), seed=st.integers(0, 99))
def test_product_running_mean_is_product_of_running_means(T, b, n, d, seed):
    torch.manual_seed(seed)
    a = torch.randint(-1, 2, (T, b, n, d)).float()
    c = torch.randint(-1, 2, (T, b, d, n)).float()
    prod = SpikeProduct()
    outs = torch.stack([prod(a[i], c[i]) for i in range(T)])
    t = torch.arange(1, T + 1).reshape(-1, 1, 1, 1)
    mean_out = torch.cumsum(outs, 0) / t
    expected = (torch.cumsum(a, 0) / t) @ (torch.cumsum(c, 0) / t)
    assert torch.allclose(mean_out, expected, atol=1e-5)
    reset_net(prod)
    set_step_mode(prod, "m", T)
    multi = prod(a.reshape(T * b, n, d), c.reshape(T * b, d, n)).reshape(outs.shape)
    assert torch.allclose(multi, outs, atol=1e-5)


def _masked_product(a, c, keep_a, keep_c, gains, mode):
    """MaskedSpikeProduct's outputs [T, ...] for streams a, c and the events kept of them (masks keep_*)."""
    T, prod = a.shape[0], MaskedSpikeProduct()
    if mode == "s":
        return torch.stack([prod(keep_a[i] * a[i], keep_c[i] * c[i], a[i], c[i], *gains) for i in range(T)])
    set_step_mode(prod, "m", T)
    fold = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    out = prod(fold(keep_a * a), fold(keep_c * c), fold(a), fold(c), *gains)
    return out.reshape(T, *a.shape[1:-1], c.shape[-1])


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 8), b=st.integers(1, 3), n=st.integers(1, 5), d=st.integers(1, 4), seed=st.integers(0, 99),
       p=st.floats(0.1, 0.9), gains=st.tuples(st.floats(0.5, 3), st.floats(0.5, 3)), mode=st.sampled_from("sm"))
def test_masked_product_skips_a_skipped_events_increment_only(T, b, n, d, seed, p, gains, mode):
    """MaskedSpikeProduct keeps every event in its running sums: with all events kept and unit gains it is
    SpikeProduct; the outputs up to T sum to P(T) / T with P(T) = sum_t g_a kept_a(t) S_B(t) + g_b S_A(t-1)
    kept_b(t) (a hand count), so a mask and its complement add up to the unmasked product; step == multi-step."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (T, b, n, d), generator=gen).float()
    c = torch.randint(-1, 2, (T, b, d, n), generator=gen).float()
    keep_a, keep_c = ((torch.rand(x.shape, generator=gen) >= p).float() for x in (a, c))
    ones = torch.ones_like(a), torch.ones_like(c)
    prod = SpikeProduct()
    full = torch.stack([prod(a[i], c[i]) for i in range(T)])
    torch.testing.assert_close(_masked_product(a, c, *ones, (1.0, 1.0), mode), full, atol=1e-5, rtol=1e-5)
    masked = _masked_product(a, c, keep_a, keep_c, gains, mode)
    sums_a, sums_c = torch.cumsum(a, 0), torch.cumsum(c, 0)
    before_a = torch.cat([torch.zeros_like(a[:1]), sums_a[:-1]])
    hand = (gains[0] * (keep_a * a) @ sums_c + gains[1] * before_a @ (keep_c * c)).sum(0)
    torch.testing.assert_close(masked.sum(0), hand / T, atol=1e-4, rtol=1e-5)
    rest = _masked_product(a, c, 1 - keep_a, 1 - keep_c, (1.0, 1.0), mode)
    torch.testing.assert_close(_masked_product(a, c, keep_a, keep_c, (1.0, 1.0), mode) + rest, full,
                               atol=1e-5, rtol=1e-5)
    other = "m" if mode == "s" else "s"
    torch.testing.assert_close(_masked_product(a, c, keep_a, keep_c, gains, other), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCTIONS) + ["product"])
def test_step_outputs_are_not_overwritten_by_later_steps(name):
    """Without autograd the steps work in place on buffers the module keeps (through the C kernels, or the eager
    path with them disabled): an output the caller holds keeps its value through later steps, and both paths
    give the same values bitwise."""
    gen = torch.Generator().manual_seed(len(name))
    T = 6
    xs, ys = torch.randn(T, 3, 4, 6, generator=gen) * 3, torch.randn(T, 3, 6, 5, generator=gen)
    module = SpikeProduct() if name == "product" else ExpectationCompensation(_randomise(FUNCTIONS[name]()))
    results = []
    for path in (contextlib.nullcontext, kernels.disabled):
        reset_net(module)
        held, copies = [], []
        with torch.no_grad(), path():
            for x, y in zip(xs, ys):
                held.append(module(x, y) if name == "product" else module(x))
                copies.append(held[-1].clone())
        assert all(torch.equal(h, c) for h, c in zip(held, copies)), path.__name__
        results.append(torch.stack(copies))
    assert torch.equal(*results)


def test_first_step_is_exactly_f():
    fn = nn.GELU()
    x = torch.randn(5, 6)
    assert torch.equal(ExpectationCompensation(fn)(x), fn(x))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 9), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), carried=st.booleans(),
       transposed=st.booleans(), grad=st.booleans(), seed=st.integers(0, 10_000))
def test_multi_step_running_sums_are_bitwise_step_modes(T, shape, carried, transposed, grad, seed):
    """S(t) of a multi-step call (one addition per step) is bitwise the step-mode accumulation, with and
    without autograd, from a carried sum or from zero, for strided inputs too; the input is left unchanged."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, *shape, generator=gen) * 10 ** torch.randint(-3, 4, (T, *shape), generator=gen)
    if transposed and len(shape) > 1:
        xs = xs.transpose(-1, -2)
    before = torch.randn(xs.shape[1:], generator=gen) if carried else None
    given_xs = xs.clone()
    total, steps = before, []
    for x in xs:
        total = _accumulate(None if total is None else total.clone(), x)
        steps.append(total.clone())
    with torch.set_grad_enabled(grad):
        sums = _running_sums(xs.requires_grad_(grad), before)
    assert torch.equal(sums.detach(), torch.stack(steps))
    assert torch.equal(xs.detach(), given_xs)


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_running_sums_gradient_is_the_sums_gradient(T, carried):
    gen = torch.Generator().manual_seed(T)
    xs = torch.randn(T, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    before = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True) if carried else None
    assert torch.autograd.gradcheck(_running_sums, (xs, before))
