import inspect

import pytest
import timm.layers
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from convert.rewrite import ACTIVATIONS
from models.ecm import ExpectationCompensation, SpikeProduct
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


def test_first_step_is_exactly_f():
    fn = nn.GELU()
    x = torch.randn(5, 6)
    assert torch.equal(ExpectationCompensation(fn)(x), fn(x))
