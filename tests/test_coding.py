"""Differential coding: a neuron sends k(t) - k(t-1) instead of k(t) (models.neurons, DESIGN section 10)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from convert import convert
from convert.energy import energy_report
from models.families import tiny
from models.neurons import IFNeuron, SignedIFNeuron, TernaryNeuron
from models.state import reset_net, set_step_mode
from tests.conftest import build
from tests.test_families import FAMILIES, HORIZON, images, rel_err
from tests.test_neurons import NEURONS as ALL_NEURONS

NEURONS = [make for make in ALL_NEURONS if not isinstance(make(), TernaryNeuron)]  # no leak, soft reset


def steps(neuron, xs):
    """Per step: (output, what was sent, events)."""
    reset_net(neuron)
    set_step_mode(neuron, "s")
    outs, sent, events = [], [], []
    for x in xs:
        out = neuron(x)
        outs.append(out)
        sent.append(neuron.sent(out))
        events.append(neuron.events(out))
    reset_net(neuron)
    return torch.stack(outs), torch.stack(sent), torch.stack(events)


@settings(max_examples=40, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 12), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       theta=st.floats(0.05, 3.0), hysteresis=st.sampled_from([0.0, 0.25, 1.0]), seed=st.integers(0, 1000))
def test_receiver_rebuilds_the_levels_and_step_equals_multistep(idx, T, shape, theta, hysteresis, seed):
    """The running sum of what was sent is the level; multi-step mode gives the same outputs and sent values;
    without hysteresis the outputs are bitwise the rate-coded neuron's."""
    torch.manual_seed(seed)
    xs = torch.randn(T, *shape) * 2 * theta
    rate = NEURONS[idx]()
    rate.threshold.data.fill_(theta)
    neuron = NEURONS[idx]()
    neuron.threshold.data.fill_(theta)
    neuron.set_coding("differential", hysteresis)
    out, sent, _ = steps(neuron, xs)
    levels = torch.round(out / theta)
    assert torch.allclose(out / theta, levels, atol=1e-4)
    assert set(levels.unique().int().tolist()) <= set(neuron.levels())
    assert torch.equal(torch.cumsum(sent, 0), levels)
    if hysteresis == 0:
        assert torch.equal(out, steps(rate, xs)[0])
    set_step_mode(neuron, "m", T)
    multi = neuron(xs.reshape(T * shape[0], *shape[1:]))
    assert torch.equal(multi.reshape(out.shape), out)
    assert torch.equal(neuron.sent(multi).reshape(sent.shape), sent)


@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("hysteresis", [0.0, 0.5, 2.0])
def test_running_mean_error_is_within_half_plus_hysteresis(levels, signed, hysteresis):
    """|mean output - x| <= (1/2 + s) theta / t inside the range."""
    neuron = SignedIFNeuron(levels) if signed else IFNeuron(levels)
    neuron.set_coding("differential", hysteresis)
    x = torch.linspace(-levels if signed else 0, levels, 101) * 0.999
    T = 24
    out = steps(neuron, x.expand(T, -1))[0]
    means = torch.cumsum(out, 0) / torch.arange(1, T + 1)[:, None]
    bound = (0.5 + hysteresis) / torch.arange(1, T + 1)[:, None] + 1e-5
    assert ((means - x).abs() <= bound).all()


@pytest.mark.parametrize("levels", [2, 4, 8])
def test_a_constant_input_sends_fewer_events_after_the_first_step(levels):
    """Rate coding sends |x| / theta events every step; differential coding sends the level once and then
    only its dithering, and hysteresis thins the dithering further."""
    x = torch.rand(2000) * levels
    rate = SignedIFNeuron(levels)
    plain, held = SignedIFNeuron(levels), SignedIFNeuron(levels)
    plain.set_coding("differential", 0.0)
    held.set_coding("differential", 1.0)
    T = 32
    per_step = {name: steps(n, x.expand(T, -1))[2].mean(dim=1) for name, n in
                (("rate", rate), ("plain", plain), ("held", held))}
    assert torch.allclose(per_step["plain"][0], per_step["rate"][0])  # the first step sends the level
    later = {name: float(e[1:].mean()) for name, e in per_step.items()}
    assert later["plain"] < 0.6 * later["rate"]  # about 1 / L of it: the level dithers by one
    assert later["held"] < 0.5 * later["plain"]
    assert float(per_step["held"][T // 2:].mean()) < float(per_step["held"][0]) / levels


def test_leaky_or_hard_reset_neurons_refuse_differential_coding():
    with pytest.raises(ValueError, match="coding=differential needs a neuron without leak"):
        TernaryNeuron().set_coding("differential")
    with pytest.raises(ValueError, match="unknown coding 'delta'"):
        SignedIFNeuron().set_coding("delta")
    with pytest.raises(ValueError, match="hysteresis must be >= 0"):
        SignedIFNeuron().set_coding("differential", -0.5)


@pytest.mark.parametrize("options, message", [
    (dict(neuron="ternary"), "coding=differential sends changes"),
    (dict(attention="ssa"), "coding=differential sends changes"),
    (dict(attention="a2os2a"), "coding=differential sends changes"),
    (dict(residual="spike_driven"), "coding=differential sends changes"),
])
def test_combinations_that_need_rate_spikes_are_refused(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        convert(build("cls_token"), torch.randn(2, 3, 16, 16), timesteps=2, coding="differential", progress=False,
                **options)


def test_hysteresis_without_differential_coding_is_refused():
    with pytest.raises(ValueError, match="applies to coding=differential only"):
        convert(build("cls_token"), torch.randn(2, 3, 16, 16), timesteps=2, hysteresis=0.5, progress=False)


@pytest.mark.parametrize("name", ["cls_token", "relu_mlp", "register_tokens", "distilled"])
@pytest.mark.parametrize("neuron, levels", [("signed_if", 1), ("signed_if", 3), ("multi_threshold", 4)])
def test_network_step_mode_equals_multistep_and_no_hysteresis_equals_rate(name, neuron, levels, images):
    ann = build(name)
    kw = dict(timesteps=6, neuron=neuron, levels=levels, progress=False)
    rate = convert(ann, images, **kw).simulate(images)
    step = convert(ann, images, coding="differential", **kw).simulate(images)
    assert torch.equal(step, rate)
    held = [convert(ann, images, coding="differential", hysteresis=0.5, step_mode=mode, **kw).simulate(images)
            for mode in ("s", "m")]
    assert torch.allclose(held[0], held[1], atol=1e-4, rtol=1e-4), (held[0] - held[1]).abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_converges_with_hysteresis(name):
    """Hysteresis s = 1/2 doubles the error bound, (1/2 + s) theta / t: the SNN still converges as 1/T (the
    rate-coded bound of test_families, 0.1, doubled)."""
    ann, size = tiny(name)
    x = images(size, 4, seed=1)
    with torch.no_grad():
        ref = ann(x)
    T = HORIZON.get(name, 64)
    snn = convert(ann, x, timesteps=T, calibration="max", coding="differential", hysteresis=0.5, progress=False,
                  step_mode="m")
    err = rel_err(snn.simulate(x), ref)
    assert err[T - 1] < 0.2 and err[T - 1] < 0.5 * err[T // 8 - 1], (err[0], err[T // 8 - 1], err[T - 1])


def test_psa_masks_levels_under_differential_coding(images):
    """psa's masks act on the attention operands' levels, which differential coding leaves as they are."""
    ann = build("cls_token")
    kw = dict(timesteps=6, attention="psa", mask_p=0.25, progress=False)
    rate = convert(ann, images, **kw)
    diff = convert(ann, images, coding="differential", **kw)
    assert torch.equal(rate.simulate(images), diff.simulate(images))
    products = [{n: v["sops"] for n, v in energy_report(snn, images)["layers"].items() if n.endswith((".qk", ".av"))}
                for snn in (rate, diff)]
    assert products[0] and products[0] == products[1]  # the masked levels, whatever the coding


def test_differential_coding_sends_fewer_events_for_the_same_outputs():
    """Same outputs as rate coding (no hysteresis) at a fraction of the synapses' events when the
    alphabet is multi-level; the first layer is charged once (the image arrives at step 1)."""
    ann = build("cls_token")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(timesteps=8, levels=4, progress=False)
    rate = energy_report(convert(ann, x, **kw), x)
    diff = energy_report(convert(ann, x, coding="differential", **kw), x)
    syn = lambda r: sum(v.get("sops", 0) for n, v in r["layers"].items() if n.endswith(("qkv", "proj", "fc1", "fc2")))  # noqa: E731
    assert syn(diff) < 0.8 * syn(rate)
    assert diff["layers"]["patch_embed.proj"]["macs"] == pytest.approx(rate["layers"]["patch_embed.proj"]["macs"] / 8)
    assert diff["energy_snn_pj"] < rate["energy_snn_pj"]
