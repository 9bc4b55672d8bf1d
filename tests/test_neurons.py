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
