"""Checkpoints, energy counts and the run folder's files."""

import pytest
import torch
from safetensors.torch import save_file

from convert import convert, energy_report, load, save
from models import create_ann
from models.neurons import BaseNeuron
from models.synapse import SpikingSynapse

TINY = dict(img_size=32, patch_size=8, num_classes=5, depth=2, embed_dim=48, num_heads=3)


def tiny_ann(**extra):
    torch.manual_seed(0)
    return create_ann("vit_tiny_patch16_224", pretrained=False, **{**TINY, **extra})


@pytest.mark.parametrize("options", [
    {}, dict(correction="bias"), dict(per_channel=True), dict(neuron="multi_threshold", levels=4),
    dict(neuron="if", levels=2, step_mode="m"), dict(calibration="mse"),
    dict(coding="differential", levels=2, hysteresis=0.5), dict(coding="differential", step_mode="m"),
])
def test_save_load_round_trip_is_bitwise(options, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    snn = convert(tiny_ann(), x, timesteps=4, progress=False, **options)
    path = save(snn, tmp_path / "snn.safetensors")
    again = load(path)
    assert torch.equal(snn.simulate(x), again.simulate(x))
    assert again.options == snn.options and again.timesteps == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_load_without_bias_layers(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    snn = convert(tiny_ann(qkv_bias=False), x, timesteps=3, correction="bias", progress=False)
    again = load(save(snn, tmp_path / "snn.safetensors"))
    assert torch.equal(snn.simulate(x), again.simulate(x))


def test_bad_checkpoints_name_the_file(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    path = save(convert(tiny_ann(), x, timesteps=2, progress=False), tmp_path / "snn.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load(truncated)
    plain = tmp_path / "ann.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_ann().state_dict().items()}, str(plain))
    with pytest.raises(ValueError, match="ann.safetensors is not a vit-snn SNN checkpoint"):
        load(plain)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load(tmp_path / "missing.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**meta, "version": "99"})
    with pytest.raises(ValueError, match="newer format version"):
        load(newer)


class Wrapped(torch.nn.Module):
    """A model class timm does not know: how it was built cannot be recorded."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)


def test_unknown_architecture_cannot_be_saved_unless_given(tmp_path):
    from tests.conftest import build
    x = torch.randn(2, 3, 16, 16)
    ann = Wrapped(build("relu_mlp"))
    with pytest.raises(ValueError, match="how the ANN was built is unknown"):
        save(convert(ann, x, timesteps=2, progress=False), tmp_path / "s.safetensors")
    assert not list(tmp_path.iterdir())
    spec = {"class": f"{__name__}:Wrapped"}  # outside the modules a checkpoint may name: refused at load
    snn = convert(ann, x, timesteps=2, progress=False, architecture=spec)
    with pytest.raises(ValueError, match="outside the modules a checkpoint may use"):
        load(save(snn, tmp_path / "s.safetensors"))


@pytest.mark.parametrize("options", [{}, dict(levels=3), dict(coding="differential"),
                                     dict(coding="differential", levels=3, hysteresis=0.5)])
def test_energy_counts_match_a_hand_count(options):
    """depth-1 ViT, D=8, 1 head, patch = image (N = 2 tokens), MLP 16, K = 3 classes, T = 3.

    Hand count: what each neuron sent is k = out / theta (rate) or the change of k (differential); a
    synapse's standard SOPs are |k| x fan-out, its strict count takes |k| = 1 as one SOP and |k| > 1 as one
    MAC per synapse; products count the levels of their operands."""
    torch.manual_seed(0)
    ann = create_ann("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=8, in_chans=1,
                     num_classes=3, depth=1, embed_dim=8, num_heads=1, mlp_ratio=2.0)
    x = torch.randn(2, 1, 8, 8)
    T, N, D, H, K = 3, 2, 8, 16, 3
    snn = convert(ann, x, timesteps=T, progress=False, **options)
    differential = options.get("coding") == "differential"
    sent, levels, previous = {}, {}, {}

    def record(name):
        def hook(module, inputs, output):
            if module.analog:  # energy_report also runs one analog pass for the ANN counts
                previous.pop(name, None)
                return
            k = torch.round(output / module.theta(output))
            change = k - previous.get(name, torch.zeros_like(k)) if differential else k
            previous[name] = k
            add = lambda d, key, v: d.__setitem__(key, d.get(key, 0.0) + float(v))  # noqa: E731
            add(sent, (name, "events"), change.abs().sum())
            add(sent, (name, "ones"), (change.abs() == 1).sum())
            add(sent, (name, "graded"), (change.abs() > 1).sum())
            add(levels, (name, "events"), k.abs().sum())
            add(levels, (name, "ones"), (k.abs() == 1).sum())
            add(levels, (name, "graded"), (k.abs() > 1).sum())
        return hook
    handles = [m.register_forward_hook(record(n)) for n, m in snn.net.named_modules() if isinstance(m, BaseNeuron)]
    report = energy_report(snn, x)
    for h in handles:
        h.remove()
    # ANN: patch conv, qkv, QK^T, AV, proj, fc1, fc2, head; LN x3 (N*D each), the map's exp N*N and its
    # normalisation N*D (the row_max map: exp(s - max), then A V / A 1), GELU N*H
    ann_linear = 1 * 64 * D + N * D * 3 * D + N * N * D + N * N * D + N * D * D + N * D * H + N * H * D + D * K
    ann_nonlinear = 3 * N * D + N * N + N * D + N * H
    assert report["ann_macs"] == pytest.approx(ann_linear + ann_nonlinear)
    # SNN, per image (counts were recorded over both images, T steps)
    fan_out = {f"{n}.neuron": m.layer.out_features for n, m in snn.net.named_modules() if isinstance(m, SpikingSynapse)}
    sops_syn = sum(sent[(n, "events")] * f for n, f in fan_out.items()) / 2
    strict_sops_syn = sum(sent[(n, "ones")] * f for n, f in fan_out.items()) / 2
    strict_macs_syn = sum(sent[(n, "graded")] * f for n, f in fan_out.items()) / 2
    attend = "blocks.0.attn.attend."
    operands = {attend + "q_neuron": N, attend + "k_neuron": N, attend + "attn_neuron": D, attend + "v_neuron": N}

    def products(what):
        return sum(levels[(n, what)] * f for n, f in operands.items()) / 2
    attn = attend + "attn_neuron"
    row_sums = (levels[(attn, "ones")] + levels[(attn, "graded")]) / 2  # one addition per non-zero map spike
    sops_prod = products("events") + row_sums
    first_layer = (1 if differential else T) * 64 * D  # differential: the image arrives once
    snn_macs = first_layer + T * (ann_nonlinear + N * N + N * D)  # + ECM, rescaling of QK^T and AV
    assert report["snn_sops"] == pytest.approx(sops_syn + sops_prod)
    assert report["snn_macs"] == pytest.approx(snn_macs)
    assert report["energy_snn_pj"] == pytest.approx(4.6 * snn_macs + 0.9 * (sops_syn + sops_prod))
    assert report["energy_ann_pj"] == pytest.approx(4.6 * (ann_linear + ann_nonlinear))
    assert report["snn_strict_sops"] == pytest.approx(strict_sops_syn + products("ones") + row_sums)
    assert report["snn_strict_macs"] == pytest.approx(snn_macs + strict_macs_syn + products("graded"))
    if options.get("levels", 1) > 1:  # graded values were sent: the strict split above was exercised
        assert strict_macs_syn > 0
    for name, rate in report["firing_rates"].items():  # a change of level spans up to 2 L
        assert 0.0 <= rate <= snn.net.get_submodule(name).max_level * (2 if differential else 1)
    if not differential:
        assert report["analog_ops"][0]["module"] == "patch_embed.proj"
    assert sum(o["energy_share"] for o in report["analog_ops"]) == pytest.approx(report["analog_share"])


def test_strict_accounting_counts_graded_inputs_as_macs():
    x = torch.randn(2, 3, 32, 32)
    binary = energy_report(convert(tiny_ann(), x, timesteps=2, progress=False), x)
    assert binary["energy_snn_strict_pj"] == pytest.approx(binary["energy_snn_pj"])
    graded = energy_report(convert(tiny_ann(), x, timesteps=2, levels=4, progress=False), x)
    assert graded["snn_strict_macs"] > graded["snn_macs"]
    assert graded["energy_snn_strict_pj"] > graded["energy_snn_pj"]


def test_sweep_rows_equal_simulate_and_plots_have_one_line_per_variant():
    from torch.utils.data import DataLoader, TensorDataset

    from convert.evaluate import evaluate
    from convert.plots import energy_figure, sweep_figure
    from convert.run import sweep_rows
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 5, (10,))
    snn = convert(tiny_ann(), x, timesteps=4, progress=False)
    result = evaluate(snn, DataLoader(TensorDataset(x, y), batch_size=3), 4, progress=False)
    per_step = snn.simulate(x)
    expected = [(per_step[t].argmax(-1) == y).float().mean().item() * 100 for t in range(4)]
    rows = sweep_rows("a", result)
    assert [r["top1"] for r in rows] == pytest.approx(expected)
    rows += sweep_rows("b", result)
    fig = sweep_figure(rows, 50.0)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and ax.get_xscale() == "log"
    assert ax.get_lines()[-1].get_linestyle() == "--"
    fig = energy_figure([{"variant": v, "t": t, "top1": 1.0, "energy_uj": t} for v in "abc" for t in (1, 2)], 1.0, 3.0)
    assert len(fig.axes[0].get_lines()) == 4


def test_write_files_replaces_whole_files_only(tmp_path):
    from convert.run import write_files
    x = torch.randn(2, 3, 32, 32)
    snn = convert(tiny_ann(), x, timesteps=2, progress=False)
    out = tmp_path / "run"
    write_files(out, {"report.json": b"old"}, snn)
    with pytest.raises(RuntimeError):
        class Boom(dict):
            def items(self):
                raise RuntimeError("disk full")
        write_files(out, Boom(), snn)
    assert (out / "report.json").read_bytes() == b"old"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "snn.safetensors"]


@pytest.mark.parametrize("build_ann", [
    lambda: __import__("timm").create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                            num_heads=3, num_classes=10),
    lambda: __import__("timm").models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, global_pool="avg",
        class_token=False),
    lambda: __import__("timm").models.eva.Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              num_classes=4, use_rot_pos_emb=True, swiglu_mlp=True),
], ids=["create_model-kwargs", "VisionTransformer-direct", "Eva-direct"])
def test_models_built_with_any_arguments_save_and_load_bitwise(build_ann, tmp_path):
    """The architecture is recorded when the model is built (timm.create_model kwargs or a timm class's
    arguments), so the SNN loads back with no ANN weights file."""
    torch.manual_seed(0)
    ann = build_ann().eval()
    x = torch.randn(3, 3, 32, 32)
    snn = convert(ann, x, timesteps=3, progress=False)
    again = load(save(snn, tmp_path / "snn.safetensors"))
    assert torch.equal(snn.simulate(x), again.simulate(x))
