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


@pytest.mark.parametrize("max_level", [1, 4])
@pytest.mark.parametrize("T", [2, 8])
def test_mse_beats_max_and_percentile_on_its_objective(max_level, T):
    torch.manual_seed(0)
    hist = RunningHistogram()
    hist.update(torch.distributions.StudentT(3.0).sample((50000,)))
    errs = {}
    for method in ("max", "percentile", "mse"):
        theta = choose_thresholds(hist, method, max_level, signed=True, percentile=99.9, timesteps=T)
        errs[method] = float(expected_error(hist, np.array([float(theta)]), max_level, T, True)[0])
    assert errs["mse"] <= errs["max"] and errs["mse"] <= errs["percentile"]


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
        assert min(np.atleast_1d(entry["threshold"])) > 0 and 0 <= entry["clipped"] <= 1 and entry["expected_error"] >= 0
        assert 0 <= entry["firing_rate"] <= 1
    assert any("bias_shift" in e for e in report.values())


def test_fewer_calibration_images_than_asked_warns_with_the_number_used():
    from convert import convert
    from tests.conftest import build
    with pytest.warns(UserWarning, match="only 5 calibration images available \\(asked for 64\\)"):
        convert(build("cls_token"), torch.randn(5, 3, 16, 16), timesteps=2, num_images=64, progress=False)
