import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from calibration import RunningHistogram, choose_thresholds, expected_error


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(0.01, 100.0), q=st.sampled_from([50.0, 90.0, 99.0, 99.9, 100.0]),
       batches=st.integers(1, 6))
def test_streamed_quantile_matches_exact_quantile(seed, scale, q, batches):
    torch.manual_seed(seed)
    data = torch.randn(batches, 5000, dtype=torch.float64) * scale * torch.linspace(0.5, 2, batches)[:, None]
    hist = RunningHistogram(bins=4096)
    for chunk in data:
        hist.update(chunk)
    got = float(hist.quantile(q / 100, signed=True)[0])
    mags = data.abs().flatten()
    width = hist.range / hist.bins
    # got is a q-quantile up to one bin: at most a share q lies below it, at least q at or below it
    assert float((mags < got - width).double().mean()) <= q / 100 + 1e-12
    assert float((mags <= got + width).double().mean()) >= q / 100 - 1e-12


def test_unsigned_quantile_counts_negatives_as_zero():
    hist = RunningHistogram()
    hist.update(torch.cat([-torch.ones(600), torch.linspace(0.001, 1.0, 400)]))
    assert float(hist.quantile(0.5, signed=False)[0]) == 0.0
    assert abs(float(hist.quantile(0.8, signed=False)[0]) - 0.5) < 0.01
    assert float(hist.maximum(False)[0]) == 1.0


def test_memory_is_independent_of_the_number_of_images():
    hist = RunningHistogram(bins=512, channels=8)
    sizes = []
    for i in range(20):
        hist.update(torch.randn(100 * (i + 1), 8) * (i + 1))
        sizes.append(sum(t.numel() for t in (hist.pos, hist.neg, hist.zeros, hist.max_pos, hist.max_neg)))
    assert len(set(sizes)) == 1
    assert hist.count.sum() == 8 * 100 * sum(range(1, 21))


def _outlier_samples(seed: int, scale: float, share: float, n: int = 20000) -> torch.Tensor:
    """Three channels of heavy-tailed activations with a share of outliers ``scale`` times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(4.0).sample((n, 3)) * torch.tensor([1.0, 0.3, 3.0])
    outliers = torch.rand(n, 3, generator=g) < share
    return torch.where(outliers, x * scale, x).double()


def _quantiser(x: torch.Tensor, theta, levels: int, T: int) -> torch.Tensor:
    """Q_T,L: x rounded (half up) to a multiple of theta / T, clipped to +-L theta."""
    k = torch.clamp(torch.floor(x * T / theta + 0.5), -levels * T, levels * T)
    return k * theta / T


@settings(max_examples=40, deadline=None)
@given(levels=st.sampled_from([1, 2, 4]), T=st.integers(1, 24), theta=st.floats(0.1, 3.0), seed=st.integers(0, 999))
def test_a_signed_if_neuron_realises_the_quantiser(levels, T, theta, seed):
    """Fed a constant x for T steps, its mean output is exactly Q_T,L(x): the model the thresholds minimise."""
    from models.neurons import SignedIFNeuron
    from models.state import run_steps
    torch.manual_seed(seed)
    x = torch.randn(400) * 2 * levels * theta
    neuron = SignedIFNeuron(levels)
    neuron.threshold.data.fill_(theta)
    mean = run_steps(neuron, x, T).mean(0)
    near_edge = ((x * T / theta) - torch.floor(x * T / theta) - 0.5).abs() < 1e-4  # float rounding at half steps
    expected = _quantiser(x, theta, levels, T)
    assert torch.allclose(mean[~near_edge], expected[~near_edge].float(), atol=1e-5 * theta * levels)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 999), scale=st.floats(5.0, 100.0), share=st.floats(0.0, 0.01), signed=st.booleans())
def test_mse_error_never_grows_when_t_or_levels_double(seed, scale, share, signed):
    hist = RunningHistogram(channels=3)
    hist.update(_outlier_samples(seed, scale, share))
    err = {}
    for T in (1, 2, 4, 8, 16, 32):
        for L in (1, 2, 4, 8):
            theta = choose_thresholds(hist, "mse", L, signed, timesteps=T)
            err[T, L] = expected_error(hist, theta.numpy(), L, T, signed)
    for (T, L), e in err.items():
        if (2 * T, L) in err:
            assert (err[2 * T, L] <= e + 1e-12).all(), (T, L)
        if (T, 2 * L) in err:
            assert (err[T, 2 * L] <= e + 1e-12).all(), (T, L)


@pytest.mark.parametrize("levels, T", [(1, 4), (1, 32), (4, 4)])
def test_expected_error_is_the_simulated_neurons_error(levels, T):
    """The histogram's expected error equals the mean squared error of a signed IF neuron's T-step mean on the
    raw samples (to the histogram's resolution), for the mse thresholds and for others."""
    from models.neurons import SignedIFNeuron
    from models.state import run_steps
    x = _outlier_samples(0, 20.0, 0.005)[:, 2]
    hist = RunningHistogram()
    hist.update(x)
    best = float(choose_thresholds(hist, "mse", levels, True, timesteps=T))
    for theta in (best, 0.5 * best, 2 * best):
        neuron = SignedIFNeuron(levels)
        neuron.threshold.data.fill_(theta)
        simulated = float(((run_steps(neuron, x.float(), T).mean(0).double() - x) ** 2).mean())
        model = float(expected_error(hist, np.array([theta]), levels, T, True)[0])
        assert model == pytest.approx(simulated, rel=0.05)


def test_mse_thresholds_are_the_minimum_of_their_objective():
    """The chosen range costs at most 1% more expected error than the best of a 4x finer grid."""
    hist = RunningHistogram(channels=3)
    hist.update(_outlier_samples(1, 30.0, 0.003))
    for levels, T in ((1, 2), (1, 16), (4, 8)):
        theta = choose_thresholds(hist, "mse", levels, True, timesteps=T)
        chosen = expected_error(hist, theta.numpy(), levels, T, True)
        peak = hist.maximum(True).numpy()
        fine = peak[:, None] * 2.0 ** (-np.arange(256) / 32)[None, :] / levels
        errs = np.stack([expected_error(hist, fine[:, j], levels, T, True) for j in range(fine.shape[1])], 1)
        assert (chosen <= 1.01 * errs.min(1) + 1e-15).all()


def test_per_channel_thresholds_follow_each_channel():
    hist = RunningHistogram(channels=3)
    hist.update(torch.randn(4000, 3) * torch.tensor([1.0, 10.0, 100.0]))
    theta = choose_thresholds(hist, "max", 1, signed=True)
    assert theta.shape == (3,) and theta[0] < theta[1] < theta[2]


def test_same_data_same_thresholds():
    def run():
        torch.manual_seed(3)
        h = RunningHistogram()
        for _ in range(3):
            h.update(torch.randn(1000))
        return choose_thresholds(h, "percentile", 1, True, 99.0)
    assert torch.equal(run(), run())


def test_bad_calibration_arguments():
    hist = RunningHistogram()
    hist.update(torch.randn(100))
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        choose_thresholds(hist, "percentile", 1, True, percentile=120)
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        choose_thresholds(hist, "kl", 1, True)


def _layer_errors(snn, x, T):
    """Per synapse: mean |ANN - SNN| of the per-channel mean output (the ANN: analog mode)."""
    from calibration.corrections import layer_means
    from models.synapse import SpikingSynapse
    layers = [m for m in snn.net.modules() if isinstance(m, SpikingSynapse)]
    ann = layer_means(snn.net, layers, [x])
    spk = layer_means(snn.net, layers, [x], timesteps=T)
    return torch.stack([(a - s).abs().mean() for a, s in zip(ann, spk)])


@pytest.mark.parametrize("name", ["cls_token", "avg_pool_no_cls", "qk_norm"])
@pytest.mark.parametrize("T", [2, 4])
def test_bias_correction_matches_layer_means_and_reduces_held_out_error(name, T):
    from convert import convert
    from tests.conftest import build
    torch.manual_seed(0)
    calib, held_out = torch.randn(256, 3, 16, 16), torch.randn(128, 3, 16, 16)
    ann = build(name)
    plain = convert(ann, calib, timesteps=T, progress=False)
    corrected = convert(ann, calib, timesteps=T, correction="bias", progress=False)
    # on the calibration images every layer's SNN mean output equals the ANN's
    on_calib = _layer_errors(corrected, calib, T)
    assert (on_calib < 1e-4).all(), on_calib
    # on held-out images the per-layer errors fall on average (single layers may not: estimation noise)
    before, after = _layer_errors(plain, held_out, T), _layer_errors(corrected, held_out, T)
    assert after.mean() < before.mean(), (before, after)
    # the correction is spiking-only: analog mode still computes the ANN
    from calibration import analog_mode
    with analog_mode(corrected.net), torch.no_grad():
        assert torch.allclose(corrected.net(held_out), ann(held_out), atol=1e-5, rtol=1e-4)


def test_report_has_thresholds_clipping_errors_and_rates():
    from convert import convert
    from tests.conftest import build
    x = torch.randn(16, 3, 16, 16)
    snn = convert(build("cls_token"), x, timesteps=4, correction="bias", progress=False)
    report = snn.calibration_report
    assert len(report) == sum(1 for m in snn.net.modules() if m.__class__.__name__.endswith("Neuron"))
    for entry in report.values():
        assert np.min(entry["threshold"]) > 0 and 0 <= entry["clipped"] <= 1 and entry["expected_error"] >= 0
        assert 0 <= entry["firing_rate"] <= 1
    assert any("bias_shift" in e for e in report.values())


def test_fewer_calibration_images_than_asked_warns_with_the_number_used():
    from convert import convert
    from tests.conftest import build
    with pytest.warns(UserWarning, match="only 5 calibration images available \\(asked for 64\\)"):
        convert(build("cls_token"), torch.randn(5, 3, 16, 16), timesteps=2, num_images=64, progress=False)


def _rel_err(per_step, ref):
    return ((per_step - ref).flatten(1).norm(dim=1) / ref.norm()).tolist()


def test_prefix_tokens_get_their_own_thresholds_never_below_the_others():
    from convert import convert
    from models.neurons import BaseNeuron
    from tests.conftest import build
    ann = build("register_tokens")  # class token + 2 register tokens
    snn = convert(ann, torch.randn(32, 3, 16, 16), timesteps=8, progress=False)
    rows = [m.threshold for m in snn.net.modules() if isinstance(m, BaseNeuron) and m.threshold.dim() == 2]
    assert rows and all(t.shape[0] == 1 + ann.num_prefix_tokens for t in rows)
    assert all((t[:-1] >= t[-1:]).all() for t in rows)
    assert any((t[0] > t[-1]).any() for t in rows)  # the class token's range is wider somewhere
    plain = convert(ann, torch.randn(32, 3, 16, 16), timesteps=8, per_token=False, progress=False)
    assert all(m.threshold.dim() <= 1 for m in plain.net.modules() if isinstance(m, BaseNeuron))


@pytest.mark.parametrize("where", ["norm1", "norm2"])
def test_a_reparameterised_outlier_channel_converges_like_the_original(where):
    """Multiplying one LayerNorm gain channel by 50 and dividing the next Linear's input column by 50 leaves the
    ANN unchanged but puts a 50x outlier in front of a neuron: the defaults (per-channel thresholds) converge
    as before; one threshold per layer does not."""
    import copy
    from convert import convert
    from tests.conftest import build
    ann = build("cls_token")
    outlier = copy.deepcopy(ann)
    block = outlier.blocks[0]
    norm, layer = (block.norm1, block.attn.qkv) if where == "norm1" else (block.norm2, block.mlp.fc1)
    with torch.no_grad():
        norm.weight[5] *= 50
        norm.bias[5] *= 50
        layer.weight[:, 5] /= 50
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    calib = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ann(x)
        torch.testing.assert_close(outlier(x), ref, atol=1e-4, rtol=1e-4)
    errs = {}
    for label, model, opts in (("original", ann, {}), ("outlier", outlier, {}),
                               ("outlier per layer", outlier, dict(per_channel=False))):
        snn = convert(model, calib, timesteps=32, progress=False, step_mode="m", **opts)
        errs[label] = _rel_err(snn.simulate(x), ref)[-1]
    assert errs["outlier"] < 1.3 * errs["original"] + 0.02, errs
    assert errs["outlier per layer"] > 1.5 * errs["outlier"], errs


# ---- input offsets: unsigned neurons in front of Linear layers (calibration.offsets) ------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), c_in=st.integers(1, 6), c_out=st.integers(1, 5), scalar=st.booleans())
def test_an_offset_moves_the_clip_of_an_unsigned_input_to_minus_the_offset(seed, c_in, c_out, scalar):
    """In analog mode an unsigned neuron passes max(x, 0); with offset o the synapse computes
    W (max(x + o, 0) - o) + b = W max(x, -o) + b, through nn.Linear or F.linear."""
    from models.neurons import IFNeuron
    from models.synapse import SpikingSynapse
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(c_in, c_out)
    x = 3 * torch.randn(4, 7, c_in, generator=g)
    o = torch.rand((), generator=g) * 2 if scalar else torch.rand(c_in, generator=g) * 2
    expected = layer(torch.maximum(x, -o))
    for syn, args in ((SpikingSynapse(IFNeuron(1), layer), ()),
                      (SpikingSynapse(IFNeuron(1), torch.nn.functional.linear), (layer.weight, layer.bias))):
        syn.input_offset = o
        syn.neuron.analog = True
        with torch.no_grad():
            torch.testing.assert_close(syn(x, *args), expected)


def _offset_net(shift: float):
    """One Linear fed by a binary neuron, its input x * (1, 2, 0.5) + shift."""
    from models.neurons import IFNeuron
    from models.synapse import SpikingSynapse

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = SpikingSynapse(IFNeuron(1), torch.nn.Linear(3, 2))

        def forward(self, x):
            return self.fc(x * torch.tensor([1.0, 2.0, 0.5]) + shift)
    return Shifted()


@pytest.mark.parametrize("T", [2, 8, 32])
def test_input_offsets_follow_the_negative_side_and_never_pass_the_data(T):
    from calibration import calibrate
    # standard normal channels, the last one (like a GELU output) never below -0.2
    data = [torch.randn(500, 3, generator=torch.Generator().manual_seed(i)).clamp(min=torch.tensor([-9, -9, -0.2]))
            for i in range(2)]
    net = _offset_net(0.0)
    report = calibrate(net, data, timesteps=T, per_channel=True, progress=False)
    o = net.fc.input_offset
    most_negative = -torch.cat(data).mul(torch.tensor([1.0, 2.0, 0.5])).min(0).values
    assert o is not None and (o > 0).all() and (o <= most_negative + 1e-6).all()
    assert o[1] > o[0] > 0.5 > o[2]  # a wider negative side keeps more; the last one keeps all of its 0.1
    assert report["fc.neuron"]["input_offset"] == o.tolist()
    # the thresholds are chosen for x + o: the range covers more than the positive side alone
    assert (net.fc.neuron.threshold > o).all()
    nonnegative = _offset_net(10.0)  # inputs never below 0: nothing to offset
    calibrate(nonnegative, data, timesteps=T, per_channel=True, progress=False)
    assert nonnegative.fc.input_offset is None


def test_input_offsets_are_measured_on_the_anns_activations():
    """A second offset neuron sees the ANN's activations during the offset pass, not the first one's clipped
    output: its offset is the one it gets when fed those activations directly."""
    from calibration import calibrate
    from models.neurons import IFNeuron
    from models.synapse import SpikingSynapse
    torch.manual_seed(0)
    two = torch.nn.Sequential(SpikingSynapse(IFNeuron(1), torch.nn.Linear(3, 4)),
                              SpikingSynapse(IFNeuron(1), torch.nn.Linear(4, 2)))
    data = [torch.randn(400, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(two, data, timesteps=4, per_channel=True, progress=False)
    one = torch.nn.Sequential(SpikingSynapse(IFNeuron(1), two[1].layer))
    with torch.no_grad():
        calibrate(one, [two[0].layer(x) for x in data], timesteps=4, per_channel=True, progress=False)
    assert two[1].input_offset is not None and torch.equal(two[1].input_offset, one[0].input_offset)
