"""Chunked multi-step simulation (``chunk``): T steps as consecutive multi-step calls that carry the state give
the outputs of one call over all T: the same operations on the same values, so bitwise for neurons, and for
products and expectation-compensated functions up to the rounding of kernels whose blocking or vector lanes
depend on a tensor's length (matmul, CELU: one ulp)."""
import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from convert import convert, load, save
from models import kernels
from models.ecm import ExpectationCompensation, SpikeProduct
from models.families import tiny
from models.neurons import BaseNeuron
from models.state import reset_net, run_steps, set_step_mode
from tests.test_ecm import FUNCTIONS, _randomise
from tests.test_families import images
from tests.test_neurons import NEURONS


def _chunked(module, xs, chunks):
    """Outputs [T, ...] of ``module`` fed ``xs`` (each [T, B, ...]) in multi-step calls of ``chunks`` steps
    (None: one call), and for neurons what each call sent (``sent``)."""
    reset_net(module)
    outs, sent, start = [], [], 0
    for n in chunks or [len(xs[0])]:
        set_step_mode(module, "m", n, carry=chunks is not None)
        args = [x[start:start + n].reshape(n * x.shape[1], *x.shape[2:]) for x in xs]
        out = module(*args)
        outs.append(out.reshape(n, -1, *out.shape[1:]))
        if isinstance(module, BaseNeuron):
            sent.append(module.sent(out).reshape(n, -1, *out.shape[1:]))
        start += n
    set_step_mode(module, "m", 1)
    reset_net(module)
    return torch.cat(outs), (torch.cat(sent) if sent else None)


def _path(data):
    """The C kernels (models.native, the CPU default) or the eager path, drawn."""
    return kernels.disabled() if data.draw(st.booleans(), label="eager") else contextlib.nullcontext()


def _split(T, data):
    """Random chunk sizes summing to T."""
    sizes = []
    while sum(sizes) < T:
        sizes.append(data.draw(st.integers(1, T - sum(sizes))))
    return sizes


@settings(max_examples=60, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 10),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       coding=st.sampled_from(["rate", "differential", "hysteresis"]), seed=st.integers(0, 10_000), data=st.data())
def test_chunked_neuron_is_bitwise_one_call(idx, T, shape, coding, seed, data):
    neuron = NEURONS[idx]()
    if coding != "rate" and neuron.leak == 1.0 and not neuron.hard_reset:
        neuron.set_coding("differential", 0.5 if coding == "hysteresis" else 0.0)
    xs = torch.randn(T, *shape, generator=torch.Generator().manual_seed(seed)) * 2 * neuron.max_level
    with torch.no_grad(), _path(data):
        whole, whole_sent = _chunked(neuron, [xs], None)
        parts, parts_sent = _chunked(neuron, [xs], _split(T, data))
    assert torch.equal(whole, parts)
    assert torch.equal(whole_sent, parts_sent)  # differential: each call's first step sends the change too


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), T=st.integers(1, 9), batch=st.integers(1, 3),
       seed=st.integers(0, 10_000),
       data=st.data())
def test_chunked_expectation_compensation_is_one_call(name, T, batch, seed, data):
    torch.manual_seed(seed)
    ecm = ExpectationCompensation(_randomise(FUNCTIONS[name]()))
    xs = torch.randn(T, batch, 6) * 3
    with torch.no_grad(), _path(data):
        whole, parts = _chunked(ecm, [xs], None)[0], _chunked(ecm, [xs], _split(T, data))[0]
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 9), b=st.integers(1, 3), n=st.integers(1, 5), d=st.integers(1, 4), seed=st.integers(0, 10_000),
       data=st.data())
def test_chunked_spike_product_is_one_call(T, b, n, d, seed, data):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (T, b, n, d), generator=gen).float() * 0.3
    c = torch.randint(-2, 3, (T, b, d, n), generator=gen).float() * 0.7
    with torch.no_grad(), _path(data):
        whole, parts = _chunked(SpikeProduct(), [a, c], None)[0], _chunked(SpikeProduct(), [a, c], _split(T, data))[0]
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, options", [
    ("vit", {}), ("swin", {"levels": 2}), ("eva02", {}), ("vit", {"neuron": "multi_threshold", "levels": 4}),
    ("vit", {"neuron": "ternary", "attention": "a2os2a"}), ("vit", {"attention": "ssa"}),
    ("vit", {"attention": "psa", "mask_p": 0.25}), ("vit", {"residual": "spike_driven", "norm": "constant"}),
    ("swin", {"attention": "psa", "mask_p": 0.5, "mask_rescale": True, "mask_fanout": True}),
    ("vit", {"coding": "differential", "hysteresis": 0.5, "levels": 2})])
def test_chunked_network_simulation_is_one_call(name, options):
    ann, size = tiny(name)
    x = images(size, 3, seed=4)
    snn = convert(ann, x, timesteps=7, progress=False, step_mode="m", **options)
    whole = snn.simulate(x)
    for chunk in (1, 3):  # 7 steps as 1 + 1 + ... and as 3 + 3 + 1
        snn.chunk = chunk
        parts = snn.simulate(x)
        assert torch.allclose(parts, whole, atol=1e-4, rtol=1e-4), (chunk, (parts - whole).abs().max())
    assert all(not m.carry and m.u is None for m in snn.net.modules() if isinstance(m, BaseNeuron))


def test_chunk_is_kept_by_checkpoints_and_refused_under_autograd(tmp_path):
    ann, size = tiny("vit")
    x = images(size, 2, seed=1)
    snn = convert(ann, x, timesteps=4, progress=False, step_mode="m", chunk=2)
    assert load(save(snn, tmp_path / "snn.safetensors")).chunk == 2
    with pytest.raises(ValueError, match="chunked multi-step simulation .* without autograd"):
        run_steps(snn.net, x, 4, "m", chunk=2)
    with pytest.raises(ValueError, match="chunk must be an integer in 1"):
        convert(ann, x, timesteps=4, progress=False, chunk=0)
    snn.chunk = -1
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        snn.simulate(x)
