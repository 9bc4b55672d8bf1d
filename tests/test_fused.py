"""The fused simulation path (in place, no temporaries; taken whenever autograd is off) computes bitwise what
the reference path computes (out of place; taken under autograd), and no output, once returned, is changed by
a later step. The fine-tuning path (a neuron's T steps as one autograd Function with its backward pass in
closed form) gives the step-by-step graph's outputs bitwise and its gradients."""
import contextlib
import subprocess
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from benchmarks import speed
from models import kernels, native
from models.ecm import ExpectationCompensation, SpikeProduct
from models.neurons import IFNeuron, SignedIFNeuron, Surrogate
from models.families import tiny
from models.state import reset_net, run_steps, set_step_mode
from tests.conftest import build
from tests.test_ecm import FUNCTIONS, _randomise
from tests.test_families import images
from tests.test_neurons import NEURONS
from convert import convert
from models.zoo import create_ann


def _both_paths(module, xs, mode):
    """Outputs of each step ([T, ...]) on the fused path and on the reference path, plus, for the fused path,
    copies of the outputs taken when they were returned (a later step must not change them)."""
    T = len(xs[0])
    results, taken = [], []
    for grad in (False, True):
        reset_net(module)
        set_step_mode(module, mode, T)
        with torch.set_grad_enabled(grad):
            if mode == "m":
                out = module(*(x.reshape(T * x.shape[1], *x.shape[2:]) for x in xs))
                out = out.reshape(T, -1, *out.shape[1:])
            else:
                steps = []
                for t in range(T):
                    steps.append(module(*(x[t] for x in xs)))
                    if not grad:
                        taken.append(steps[-1].clone())
                out = torch.stack(steps)
        results.append(out.detach())
    reset_net(module)
    return results[0], results[1], taken


def _shaped_threshold(neuron, shape, kind, gen):
    """A scalar, per-channel (last axis or axis 1) or prefix-token-rows threshold, positive."""
    if kind == "scalar" or len(shape) < 2:
        return
    if kind == "rows" and len(shape) >= 3:
        neuron.threshold = nn.Parameter(torch.rand(2, shape[-1], generator=gen) + 0.1, requires_grad=False)
    elif kind == "axis1":
        neuron.channel_axis = 1
        neuron.threshold = nn.Parameter(torch.rand(shape[1], generator=gen) + 0.1, requires_grad=False)
    else:
        neuron.threshold = nn.Parameter(torch.rand(shape[-1], generator=gen) + 0.1, requires_grad=False)


@settings(max_examples=60, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 9), mode=st.sampled_from("sm"),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       kind=st.sampled_from(["scalar", "last", "axis1", "rows"]), seed=st.integers(0, 10_000))
def test_fused_neuron_is_bitwise_the_reference(idx, T, mode, shape, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    neuron = NEURONS[idx]()
    _shaped_threshold(neuron, shape, kind, gen)
    xs = torch.randn(T, *shape, generator=gen) * 3 * neuron.max_level
    fused, reference, taken = _both_paths(neuron, [xs], mode)
    assert torch.equal(fused, reference)
    assert all(torch.equal(a, b) for a, b in zip(taken, fused))


# the fused Triton kernels run on CUDA; here through Triton's interpreter (the same source), and on a GPU also there;
# "cpu": the C kernel (models.native), which CPU simulations take by default
KERNEL_DEVICES = ["interpreted", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def _on(device):
    """The kernels for every call, single steps of a few elements included."""
    with kernels.interpreted() if device == "interpreted" else contextlib.nullcontext(), kernels.single_steps_from(0):
        yield


def test_the_cpu_kernel_builds_here():
    """The suite's CPU simulations run the C kernel (the tests below compare it with the eager path): a machine
    without a C compiler would test the eager path alone."""
    assert native.library() is not None, "models/csrc/kernels.c did not build: install a C compiler (gcc)"


def _fresh_library(monkeypatch, tmp_path, **env):
    """native.library() as a new process would build it, with its cache in ``tmp_path`` and these variables."""
    monkeypatch.setattr(native, "_state", {"library": None, "tried": False})
    monkeypatch.setenv("VIT_SNN_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("env, message", [({"CC": "/nonexistent/cc"}, "no C compiler"),
                                          ({"CC": "cc -fno-such-flag"}, "did not build"),
                                          ({"VIT_SNN_CPU_KERNEL": "0"}, None)])
def test_without_the_cpu_kernels_simulation_warns_once_and_runs_eager(monkeypatch, tmp_path, env, message):
    """No compiler, a compiler that fails, or the kernels turned off: one warning (none when turned off), then the
    eager path, with the same outputs; no half-built library is left in the cache."""
    ann, size = tiny("vit")
    x = images(size, 2, seed=1)
    snn = convert(ann, x, timesteps=3, progress=False)
    with torch.no_grad():
        expected = run_steps(snn.net, x, 3, "m")
    _fresh_library(monkeypatch, tmp_path, **env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            assert SignedIFNeuron().fused_range(torch.randn(3, 4)) is None
            assert torch.equal(run_steps(snn.net, x, 3, "m"), expected)
    assert [message in str(w.message) for w in caught] == ([True] if message else [])
    assert not list(tmp_path.iterdir())


def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    _fresh_library(monkeypatch, tmp_path)
    compiler = ["cc"]
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    target = native._target(compiler, version, native.VARIANTS[0] + native.FLAGS)
    target.write_bytes(b"\x7fELF truncated")
    monkeypatch.delenv("CC", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = native.library()
    assert lib is not None and target.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left beside it


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(max_examples=40, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 7), mode=st.sampled_from(["s", "m", "m2"]),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       kind=st.sampled_from(["scalar", "last", "axis1", "rows"]), seed=st.integers(0, 10_000))
def test_fused_kernel_is_bitwise_the_eager_path(device, idx, T, mode, shape, kind, seed):
    """Integrate-and-fire neurons (any levels, v_init, threshold shape) run through the fused kernel give the eager
    path's outputs and membranes bitwise, in step mode, multi-step mode and chunks carried between calls; every
    other neuron keeps the eager path."""
    gen = torch.Generator().manual_seed(seed)
    neuron = NEURONS[idx]()
    _shaped_threshold(neuron, shape, kind, gen)
    dev = "cpu" if device == "interpreted" else device
    neuron.to(dev)
    xs = (torch.randn(T, *shape, generator=gen) * 3 * neuron.max_level).to(dev)
    results, calls = [], []

    def counted(*args):
        calls.append(1)
        return if_sequence(*args)

    if_sequence = kernels.if_sequence
    for fused in (True, False):
        reset_net(neuron)
        chunk = 2 if mode == "m2" else T
        with torch.no_grad(), (_on(device) if fused else kernels.disabled()), \
                pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "if_sequence", counted)
            if mode == "s":
                set_step_mode(neuron, "s")
                out = torch.stack([neuron(x) for x in xs])
            else:
                outs = []
                for start in range(0, T, chunk):
                    part = xs[start:start + chunk]
                    set_step_mode(neuron, "m", len(part), carry=len(part) < T)
                    outs.append(neuron(part.reshape(-1, *shape[1:])).reshape(part.shape))
                out = torch.cat(outs)
        results.append((out, neuron.u))
    reset_net(neuron)
    (fused, u_fused), (eager, u_eager) = results
    assert torch.equal(fused, eager)
    assert (u_fused is None) == (u_eager is None) and (u_fused is None or torch.equal(u_fused, u_eager))
    assert bool(calls) == isinstance(neuron, IFNeuron)  # the kernel ran where it applies, and nowhere else


def test_fused_kernel_leaves_other_codings_and_autograd_to_the_eager_path():
    x = torch.randn(3, 5)
    with _on("interpreted"), torch.no_grad():
        neuron = SignedIFNeuron(levels=2)
        assert neuron.fused_range(x) == (-2, 2) and IFNeuron(levels=3).fused_range(x) == (0, 3)
        neuron.set_coding("differential")
        assert neuron.fused_range(x) is None
        with torch.enable_grad():
            assert SignedIFNeuron().fused_range(x) is None
        assert SignedIFNeuron().fused_range(x.double()) is None
    with torch.no_grad():
        assert SignedIFNeuron().fused_range(x) == (-1, 1)  # a CPU tensor, not interpreted: the C kernel
        assert SignedIFNeuron().fused_range(x.bfloat16()) is None
        assert SignedIFNeuron().double().fused_range(x) is None  # a float64 threshold: not read as float32
        with pytest.MonkeyPatch.context() as patch:  # no C compiler: eager
            patch.setattr(native, "library", lambda: None)
            assert SignedIFNeuron().fused_range(x) is None
    with _on("interpreted"), kernels.disabled(), torch.no_grad():
        assert SignedIFNeuron().fused_range(x) is None
    with kernels.interpreted(), kernels.single_steps_from(16), torch.no_grad():  # single steps from 16 elements
        assert SignedIFNeuron().fused_range(x) is None and SignedIFNeuron().fused_range(x, steps=2) == (-1, 1)
        assert SignedIFNeuron().fused_range(torch.randn(4, 4)) == (-1, 1)


@pytest.mark.parametrize("device", ["interpreted", "cpu"])
@pytest.mark.parametrize("name, options", [("vit", {}), ("swin", {"levels": 2}), ("vit", {"neuron": "if"})])
def test_fused_kernel_network_simulation_is_bitwise_the_eager_one(device, name, options):
    ann, size = tiny(name)
    x = images(size, 2, seed=5)
    snn = convert(ann, x, timesteps=3, progress=False, **options)
    for mode, chunk in (("s", None), ("m", None), ("m", 2)):
        with torch.no_grad():
            with kernels.disabled():
                eager = run_steps(snn.net, x, 3, mode, chunk=chunk)
            with _on(device):
                fused = run_steps(snn.net, x, 3, mode, chunk=chunk)
        assert torch.equal(fused, eager), (mode, chunk)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape, kind", [((2, 4100), "scalar"), ((3, 70, 7), "last"), ((2, 5, 33, 300), "last"),
                                         ((4, 3, 9, 11), "axis1"), ((3, 66, 131), "rows"), ((1, 8200), "last")])
def test_cpu_kernel_blocks_and_threads_are_bitwise_the_eager_path(shape, kind, threads):
    """Sizes across the C kernel's blocks of 4096 elements (a partial last block), threshold periods shorter than
    its rows (repeated inside), longer than a block and not dividing it, split among threads; fresh and carried
    membranes."""
    gen = torch.Generator().manual_seed(len(shape) * 31 + threads)
    neuron = SignedIFNeuron(levels=2)
    _shaped_threshold(neuron, shape, kind, gen)
    xs = torch.randn(5, *shape, generator=gen) * 4
    results = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "WORK_PER_THREAD", 1)
        for ctx in (contextlib.nullcontext, kernels.disabled):
            reset_net(neuron)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with ctx():
                    outs = []
                    for part in (xs[:3], xs[3:]):
                        set_step_mode(neuron, "m", len(part), carry=True)
                        outs.append(neuron(part.reshape(-1, *shape[1:])).reshape(part.shape))
            finally:
                torch.set_num_threads(before)
            results.append((torch.cat(outs), neuron.u.clone()))
    reset_net(neuron)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _outputs_and_gradients(neuron, xs, grad_out, mode):
    """Outputs [T, ...] and the gradients of sum(outputs * grad_out) for the inputs and the threshold."""
    T = len(xs)
    x = xs.clone().requires_grad_(True)
    neuron.threshold.requires_grad_(True)
    neuron.threshold.grad = None
    reset_net(neuron)
    set_step_mode(neuron, mode, T)
    if mode == "m":
        out = neuron(x.reshape(T * x.shape[1], *x.shape[2:])).reshape(x.shape)
    else:
        out = torch.stack([neuron(x[t]) for t in range(T)])
    (out * grad_out).sum().backward()
    reset_net(neuron)
    zero = torch.zeros_like  # no gradient reached it (a staircase without surrogate)
    grads = [zero(p) if p.grad is None else p.grad for p in (x, neuron.threshold)]
    return out.detach(), *grads


@settings(max_examples=80, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 9),
       shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
       kind=st.sampled_from(["scalar", "last", "axis1", "rows"]), surrogate=st.sampled_from(Surrogate.KINDS + (None,)),
       coding=st.sampled_from(["rate", "differential", "hysteresis"]), seed=st.integers(0, 10_000))
def test_fused_backward_through_time_is_the_step_by_step_gradient(idx, T, shape, kind, surrogate, coding, seed):
    """Multi-step fine-tuning (NeuronSequence) against autograd through the step-mode graph, in float64:
    the same outputs bitwise, the same gradients for the inputs and the threshold (any shape)."""
    gen = torch.Generator().manual_seed(seed)
    neuron = NEURONS[idx]().double()
    if coding != "rate":
        if neuron.leak != 1.0 or neuron.hard_reset:
            coding = "rate"  # differential coding refuses leaky / hard-reset neurons
        else:
            neuron.set_coding("differential", 0.5 if coding == "hysteresis" else 0.0)
    _shaped_threshold(neuron, shape, kind, gen)
    neuron.double()
    neuron.surrogate = None if surrogate is None else Surrogate(surrogate)
    xs = torch.randn(T, *shape, generator=gen, dtype=torch.float64) * 2 * neuron.max_level
    grad_out = torch.randn(T, *shape, generator=gen, dtype=torch.float64)
    fused = _outputs_and_gradients(neuron, xs, grad_out, "m")
    reference = _outputs_and_gradients(neuron, xs, grad_out, "s")
    assert torch.equal(fused[0], reference[0])
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused[2], reference[2], rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)), T=st.integers(1, 8), mode=st.sampled_from("sm"),
       batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_fused_expectation_compensation_is_bitwise_the_reference(name, T, mode, batch, seed):
    torch.manual_seed(seed)
    ecm = ExpectationCompensation(_randomise(FUNCTIONS[name]()))
    xs = torch.randn(T, batch, 6) * 3
    fused, reference, taken = _both_paths(ecm, [xs], mode)
    assert torch.equal(fused, reference)
    assert all(torch.equal(a, b) for a, b in zip(taken, fused))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 8), mode=st.sampled_from("sm"), b=st.integers(1, 3), n=st.integers(1, 5),
       d=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_fused_spike_product_is_bitwise_the_reference(T, mode, b, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (T, b, n, d), generator=gen).float() * 0.3
    c = torch.randint(-2, 3, (T, b, d, n), generator=gen).float() * 0.7
    fused, reference, taken = _both_paths(SpikeProduct(), [a, c], mode)
    assert torch.equal(fused, reference)
    assert all(torch.equal(x, y) for x, y in zip(taken, fused))


@pytest.mark.parametrize("name, options", [("vit", {}), ("swin", {"levels": 2}), ("eva02", {}),
                                           ("vit", {"neuron": "multi_threshold", "levels": 4}),
                                           ("vit", {"neuron": "ternary", "attention": "a2os2a"}),
                                           ("vit", {"attention": "ssa"})])
def test_fused_network_simulation_is_bitwise_the_reference(name, options):
    ann, size = tiny(name)
    x = images(size, 3, seed=4)
    snn = convert(ann, x, timesteps=4, progress=False, **options)
    for mode in "sm":
        with torch.no_grad():
            fused = run_steps(snn.net, x, 4, mode)
        with torch.enable_grad():
            reference = run_steps(snn.net, x, 4, mode).detach()
        assert torch.equal(fused, reference), mode


def test_speed_benchmark_quick_mode_runs_and_renders():
    res = speed.run(["vit_fmnist"], [4], (1, 2), repeats=1, memory=False, finetune_timesteps=(1, 2), chunk=1)
    r = res["models"]["vit_fmnist"]
    assert all(v["step_s"] > 0 and v["epoch_s"] == v["step_s"] * 15_000 for v in res["finetune"]["timesteps"].values())
    assert set(r["modes"]) == {"s", "m", "m1"} and all(v["per_step_ratio"] > 0 for m in r["modes"].values()
                                                for v in m.values())
    assert "SignedIFNeuron" in r["profile"]["s"] and "ExpectationCompensation" in r["profile"]["m"]
    assert set(r["agreement"]) == {"m", "m1", "ann"}  # multi-step, whole or in chunks, computes step mode's outputs
    assert all(r["agreement"][m]["max_logit_error"] < 1e-5 and r["agreement"][m]["top1_agreement"] == 100
               for m in ("m", "m1"))
    md = speed.markdown(res, "test")
    assert md.startswith(speed.BEGIN) and "| vit_fmnist | 4 |" in md and md.rstrip().endswith(speed.END)
    assert "Fine-tuning (vit_fmnist, batch 4" in md and "| 2 |" in md and "| multi-step, chunks of 1 |" in md
    # a variant that changes nothing (bf16 and compile are the real ones) measures no difference in either mode
    snn = convert(create_ann("vit_fmnist"), images(28, 4, seed=0)[:, :1], timesteps=2, progress=False)
    same = speed.variant_effect(snn, images(28, 4, seed=1)[:, :1], 2, "cpu", 1, lambda *_: contextlib.nullcontext())
    assert set(same) == {"s", "m"} and all(v["max_logit_error"] == 0 and v["top1_agreement"] == 100 and
                                           v["first_call_s"] > 0 for v in same.values())
    with _on("interpreted"):  # the GPU's kernels against the eager path, through Triton's interpreter
        fused = speed.kernel_effect(snn, images(28, 4, seed=1)[:, :1], [1, 2], "cpu", 1)
    assert set(fused) == {"s", "m", "m4"} and all(set(m) == {"1", "2"} for m in fused.values())
    assert all(v["bitwise_equal"] and v["speedup"] > 0 for m in fused.values() for v in m.values())
    on_gpu = {**res, "device": "cuda", "models": {"vit_fmnist": {**r, "kernels": fused}}}
    assert "fused kernels (Triton" in speed.markdown(on_gpu, "t")
    # on the CPU the C kernels run by default: measured against the eager path, bitwise equal
    assert all(v["bitwise_equal"] for m in r["kernels"].values() for v in m.values())
    assert "fused kernels (C: neurons" in md
    with pytest.raises(SystemExit, match="one per model"):
        speed.run(["vit_fmnist", "vit_fmnist"], [4, 4, 4], (1,))


def test_compiled_simulation_is_the_eager_one_and_is_not_saved(monkeypatch, tmp_path):
    """compile=True runs the same computation through torch.compile (graph capture by dynamo; the aot_eager
    backend here, which skips the C++ code generation of the default inductor): float64 outputs equal eager's
    to rounding; nothing compiled enters the state dict, and checkpoints keep the option."""
    from torch._dynamo.utils import counters

    from convert import load, network, save
    monkeypatch.setattr(network, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    snn = convert(build("cls_token"), x, timesteps=4, progress=False, compile=True)
    keys = set(snn.state_dict())
    snn = snn.double()
    counters.clear()
    out = snn.simulate(x.double())
    assert counters["frames"]["ok"] > 0  # dynamo captured the simulation's frames
    assert set(snn.state_dict()) == keys
    snn.compiled = False
    torch.testing.assert_close(out, snn.simulate(x.double()), rtol=1e-12, atol=1e-12)
    assert load(save(snn.float(), tmp_path / "snn.safetensors")).options["compile"]
