"""attention.norm=constant: per-token norms with calibrated constant statistics (models.normalization)."""
from __future__ import annotations

import pytest
import timm.layers
import torch
from torch import nn

from calibration import analog_mode
from convert import convert, energy_report
from models.ecm import ExpectationCompensation
from models.neurons import create_neuron
from models.normalization import ConstantNorm
from models.state import run_steps
from tests.conftest import build

TOKEN_NORMS = (nn.LayerNorm, timm.layers.RmsNorm)
CONFIGS = ["cls_token", "register_tokens", "avg_pool_no_cls", "qk_norm", "res_post_block", "norm_before_avg_pool"]


def _images(n=8, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 16, 16)


def _norms(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, ConstantNorm)]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_token_norm_becomes_a_constant_norm(config):
    """Every LayerNorm over the last axis is replaced (none is left in expectation), and exact analog mode is
    still the ANN (the reference, the distillation teacher)."""
    x = _images()
    ann = build(config)
    snn = convert(ann, x, timesteps=2, norm="constant", progress=False)
    expected = sum(isinstance(m, TOKEN_NORMS) for m in ann.modules())
    assert expected and len(_norms(snn.net)) == expected
    assert not any(isinstance(m, ExpectationCompensation) and isinstance(m.fn, TOKEN_NORMS) for m in snn.net.modules())
    with torch.no_grad(), analog_mode(snn.net, exact=True):
        torch.testing.assert_close(snn.net(x), ann(x), rtol=1e-4, atol=1e-4)


def _pairs(net, norm, x):
    """(the ANN's norm output, the norm's input in analog mode) on images ``x``."""
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, i, o: seen.setdefault("a", o) if m.exact else None),
             norm.register_forward_pre_hook(lambda m, i: None if m.exact else seen.setdefault("b", i[0]))]
    with torch.no_grad():
        for exact in (True, False):
            with analog_mode(net, exact=exact):
                net(x)
    for h in hooks:
        h.remove()
    return seen["a"], seen["b"]


@pytest.mark.parametrize("config", ["cls_token", "register_tokens", "avg_pool_no_cls"])
def test_constant_norm_is_the_least_squares_fit_of_the_ann_norm(config):
    """Per channel and prefix-token row, gain * b + shift is the least-squares fit of the ANN's norm output a
    (b: the norm's input with the earlier norms constant): moving either away raises the error, and the fit
    beats the norm's own affine map with unit statistics; prefix tokens get their own rows."""
    x = _images()
    snn = convert(build(config), x, timesteps=2, norm="constant", progress=False)
    prefix = snn.net.num_prefix_tokens
    for name, norm in _norms(snn.net):
        a, b = _pairs(snn.net, norm, x)
        gain, shift = norm.norm_gain.detach(), norm.norm_shift.detach()
        token_axis = b.dim() >= 3 and prefix > 0
        assert gain.shape == ((prefix + 1, b.shape[-1]) if token_axis else (b.shape[-1],)), name

        def error(g, s):
            return float(((ConstantNorm.forward(_With(g, s), b) - a) ** 2).sum())

        best = error(gain, shift)
        step_g, step_s = 0.05 * float(gain.abs().mean()), 0.05 * (float(a.abs().mean()) + 1e-3)
        for dg, ds in [(step_g, 0), (-step_g, 0), (0, step_s), (0, -step_s)]:
            assert error(gain + dg, shift + ds) > best, name
        if token_axis:  # the class / register token rows alone: also their own optimum
            only_prefix = torch.zeros_like(gain)
            only_prefix[:prefix] = step_s
            assert error(gain, shift + only_prefix) > best and error(gain, shift - only_prefix) > best, name
        weight = norm.norm.weight.detach() if norm.norm.weight is not None else torch.ones_like(gain)
        bias = norm.norm.bias.detach() if getattr(norm.norm, "bias", None) is not None else torch.zeros_like(gain)
        assert best < error(weight.expand_as(gain), bias.expand_as(gain)), name


class _With:
    """Stands in for a fitted ConstantNorm with the given gain and shift (its forward, unblended)."""

    def __init__(self, gain, shift):
        self.norm_gain, self.norm_shift, self.exact, self.blend = gain, shift, False, 1.0


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_constant_norm_costs_no_mac_and_removes_the_norms_macs(step_mode):
    """Hand count: the SNN's MACs fall by exactly one per element of every norm per step; the ANN's count is
    unchanged (its norms still cost one MAC per element)."""
    x = _images(4)
    T = 3
    reports, elements = {}, {}
    for norm in ("ecm", "constant"):
        snn = convert(build("cls_token"), x, timesteps=T, norm=norm, step_mode=step_mode, progress=False)
        reports[norm] = energy_report(snn, x)
        if norm == "constant":
            seen = []
            hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.numel())) for _, m in _norms(snn.net)]
            with torch.no_grad(), analog_mode(snn.net):
                snn.net(x)
            for h in hooks:
                h.remove()
            elements = sum(seen) / len(x)
            for name, _ in _norms(snn.net):
                layer = reports[norm]["layers"][name]
                assert layer.get("macs", 0) == layer.get("strict_macs", 0) == 0 and layer["ann_macs"] > 0
    assert reports["ecm"]["ann_macs"] == reports["constant"]["ann_macs"]
    assert reports["ecm"]["snn_macs"] - reports["constant"]["snn_macs"] == pytest.approx(T * elements)


@pytest.mark.parametrize("neuron, levels", [("if", 1), ("signed_if", 1), ("signed_if", 4), ("multi_threshold", 4)])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_affine_map_folds_into_the_reading_neuron(neuron, levels, step_mode):
    """The energy count's reason: a neuron with threshold theta on gain * x + shift sends the same counts as one
    with threshold theta / gain on x + shift / gain (gain > 0), so the map costs no operation of its own."""
    torch.manual_seed(0)
    T, C = 6, 16
    xs = torch.randn(T, 5, C, dtype=torch.float64)
    gain = torch.rand(C, dtype=torch.float64) * 3 + 0.1
    shift = torch.randn(C, dtype=torch.float64)
    theta = torch.rand(C, dtype=torch.float64) + 0.5
    outputs = []
    for threshold, inputs in ((theta, gain * xs + shift), (theta / gain, xs + shift / gain)):
        n = create_neuron(neuron, levels=levels)
        n.threshold = nn.Parameter(threshold, requires_grad=False)
        n.step_mode = step_mode
        n.timesteps = T
        with torch.no_grad():
            out = n(inputs.reshape(T * 5, C)) if step_mode == "m" else torch.stack([n(i) for i in inputs])
        outputs.append(out.reshape(T, 5, C) / threshold)  # the counts k
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-9)
    assert outputs[0].abs().sum() > 0


@pytest.mark.parametrize("config", ["cls_token", "avg_pool_no_cls"])
def test_constant_norm_network_converges_to_its_analog_network(config):
    """The replaced network is linear in the norms, so the SNN converges to its own analog network as T grows."""
    x = _images(4)
    ann = build(config)
    errors = {}
    for T in (4, 64):
        snn = convert(ann, x, timesteps=T, norm="constant", progress=False)
        with torch.no_grad():
            with analog_mode(snn.net):
                target = snn.net(x)
            out = run_steps(snn.net, x, T, "m").reshape(T, *target.shape).mean(0)
        errors[T] = float((out - target).norm() / target.norm())
    assert errors[64] < 0.35 * errors[4] and errors[64] < 0.1, errors


@pytest.mark.parametrize("name", ["swin", "swinv2", "eva02", "cait", "aimv2_swiglu", "siglip_map_head"])
def test_constant_norm_on_other_families(name):
    """Windowed, post-norm, class-attention, RMSNorm and attention-pooling families: their token norms are
    replaced, exact analog mode is the ANN, step equals multi-step."""
    from models.families import tiny
    ann, size = tiny(name)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    snn = convert(ann, x, timesteps=3, norm="constant", progress=False)
    norms = _norms(snn.net)
    assert norms and all(m.norm_gain is not None for _, m in norms)
    with torch.no_grad():
        with analog_mode(snn.net, exact=True):
            torch.testing.assert_close(snn.net(x), ann(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(run_steps(snn.net, x, 3, "s"), run_steps(snn.net, x, 3, "m"), rtol=1e-4,
                                   atol=1e-4)
