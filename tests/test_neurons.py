import pytest
import torch
from hypothesis import given, settings, strategies as st

from models.neurons import IFNeuron, MultiThresholdNeuron, SignedIFNeuron, TernaryNeuron, create_neuron
from models.state import reset_net, set_step_mode

NEURONS = [
    lambda: IFNeuron(levels=1), lambda: IFNeuron(levels=3), lambda: SignedIFNeuron(levels=1),
    lambda: SignedIFNeuron(levels=4), lambda: MultiThresholdNeuron(levels=4), lambda: TernaryNeuron(),
    lambda: MultiThresholdNeuron(levels=3, signed=False), lambda: SignedIFNeuron(levels=2, v_init=0.0),
]


def run_steps(neuron, xs):
    reset_net(neuron)
    set_step_mode(neuron, "s")
    out = torch.stack([neuron(x) for x in xs])
    reset_net(neuron)
    return out


@settings(max_examples=30, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 12), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       theta=st.floats(0.05, 3.0), seed=st.integers(0, 1000))
def test_spikes_in_alphabet_and_step_equals_multistep(idx, T, shape, theta, seed):
    neuron = NEURONS[idx]()
    neuron.threshold.data.fill_(theta)
    torch.manual_seed(seed)
    xs = torch.randn(T, *shape) * 2 * theta
    out = run_steps(neuron, xs)
    k = out / theta
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert set(k.round().unique().int().tolist()) <= set(neuron.levels())
    set_step_mode(neuron, "m", T)
    multi = neuron(xs.reshape(T * shape[0], *shape[1:])).reshape(out.shape)
    assert torch.equal(multi, out)


@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_if_running_mean_tracks_input_within_half_threshold(levels, signed):
    """Reset by subtraction with v_init = theta/2: |mean output - x| <= theta / (2t) inside the range."""
    neuron = SignedIFNeuron(levels) if signed else IFNeuron(levels)
    x = torch.linspace(-levels if signed else 0, levels, 101) * 0.999
    T = 20
    out = run_steps(neuron, x.expand(T, -1))
    means = torch.cumsum(out, 0) / torch.arange(1, T + 1)[:, None]
    bound = 0.5 / torch.arange(1, T + 1)[:, None] + 1e-5
    assert ((means - x).abs() <= bound).all()


def test_multi_threshold_levels_and_rule():
    n = MultiThresholdNeuron(levels=4)
    assert n.levels() == [-8, -4, -2, -1, 0, 1, 2, 4, 8]
    u = torch.tensor([0.49, 0.5, 1.49, 1.5, 3.5, 7.5, 100.0, -0.5, -1.5])
    assert n.fire(u).tolist() == [0, 1, 1, 2, 4, 8, 8, -1, -2]


def test_ternary_hard_reset_and_leak():
    n = TernaryNeuron()
    out = run_steps(n, torch.tensor([[0.4], [0.4], [0.0], [-0.6]]))
    # u: 0.4 -> 0.1 + 0.4 = 0.5 (fires, reset to 0) -> 0 -> -0.6 (fires -1)
    assert out.flatten().tolist() == [0.0, 1.0, 0.0, -1.0]


def test_reset_clears_state():
    n = SignedIFNeuron()
    x = torch.full((3,), 0.3)
    first = run_steps(n, x.expand(5, -1))
    second = run_steps(n, x.expand(5, -1))
    assert torch.equal(first, second)


def test_bad_neuron_arguments():
    with pytest.raises(ValueError, match="unknown neuron 'lif'"):
        create_neuron("lif")
    with pytest.raises(ValueError, match="levels must be >= 1"):
        SignedIFNeuron(levels=0)
    with pytest.raises(ValueError, match="exactly one level"):
        TernaryNeuron(levels=2)


# ---- dynamics: each neuron against its formula -------------------------------------------------------------

def _reference(neuron, xs):
    """The neuron's dynamics written out from its docstring, in threshold units: u <- leak u + x; k = fire(u);
    reset by subtraction (u <- u - k) or hard reset (u <- 0 where k != 0)."""
    u, out = torch.full_like(xs[0], neuron.v_init), []
    for x in xs:
        u = u * neuron.leak + x if out else x + neuron.v_init
        if isinstance(neuron, MultiThresholdNeuron):
            mag = u.abs() if neuron.signed else u.clamp(min=0)
            j = torch.floor(torch.log2(mag + 0.5)).clamp(0, neuron.num_levels - 1)
            k = torch.where(mag >= 0.5, 2.0 ** j, torch.zeros_like(u)) * (torch.sign(u) if neuron.signed else 1)
        elif isinstance(neuron, TernaryNeuron):
            k = torch.where(u.abs() >= 0.5, torch.sign(u), torch.zeros_like(u))
        else:
            k = torch.clamp(torch.floor(u), -neuron.num_levels if neuron.signed else 0, neuron.num_levels)
        u = torch.where(k != 0, torch.zeros_like(u), u) if neuron.hard_reset else u - k
        out.append(k)
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(idx=st.integers(0, len(NEURONS) - 1), T=st.integers(1, 16), seed=st.integers(0, 1000))
def test_every_neuron_follows_its_formula(idx, T, seed):
    neuron = NEURONS[idx]()
    torch.manual_seed(seed)
    xs = torch.randn(T, 64) * 3 * neuron.max_level
    assert torch.equal(run_steps(neuron, xs), _reference(neuron, xs))


@pytest.mark.parametrize("levels", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_multi_threshold_running_mean_error_falls_as_one_over_t(levels, signed):
    """Reset by subtraction: for constant inputs within the range, |mean - x| <= (max level / 2) theta / t."""
    neuron = MultiThresholdNeuron(levels=levels, signed=signed)
    top = neuron.max_level
    x = torch.linspace(-top if signed else 0, top, 801)
    for T in (8, 64, 512):
        err = (run_steps(neuron, x.expand(T, -1)).mean(0) - x).abs().max()
        assert float(err) * T <= max(top / 2, 0.5) + 1e-3, (T, float(err))


def test_ternary_neuron_leaks_and_resets_hard():
    """u <- 0.25 u + x: an input of 0.4 a step fires on the second step (0.1 + 0.4 = 0.5), then starts over."""
    out = run_steps(TernaryNeuron(), torch.full((6, 1), 0.4)).flatten().tolist()
    assert out == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    out = run_steps(TernaryNeuron(), torch.full((4, 1), 0.3)).flatten().tolist()  # 0.3, 0.375, 0.394, ... never
    assert out == [0.0, 0.0, 0.0, 0.0]


def test_a_neuron_caches_no_parameter_and_runs_sequences_of_another_dtype():
    """The threshold shaped for a sequence is a view, not the threshold Parameter registered a second time
    (which made the next sequence in another dtype fail)."""
    n = SignedIFNeuron()
    n(torch.randn(4, 3))
    assert [name for name, _ in n.named_parameters(remove_duplicate=False)] == ["threshold"]
    n.reset()
    out = n(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
