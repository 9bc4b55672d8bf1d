"""Every timm transformer family, through the one general rewrite: a tiny random-weight instance of each."""

import copy

import pytest
import torch

from calibration import analog_mode
from convert import convert, load, save
from models.families import TINY, tiny
from models.neurons import BaseNeuron
from models.state import run_steps
from models.synapse import SpikingProduct, SpikingSynapse
from tests.conftest import option_ids

FAMILIES = sorted(TINY)
# deep stacks of non-linear stages (convolutional stems and MBConv stages) settle more slowly
HORIZON = {"tiny_vit": 256}


def images(size: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rel_err(per_step, ref):
    return ((per_step - ref).flatten(1).norm(dim=1) / ref.norm()).tolist()


# attention with position biases, shifted-window masks, padding masks, a learned pooling query, class attention
CENTRED = ["swin", "beit", "naflexvit", "siglip_map_head", "cait", "eva02"]


SOFTMAX_MAPS = [dict(attention_map="softmax"), dict(attention_map="softmax", centre_values=True)]


@pytest.mark.parametrize("name, options", [(n, {}) for n in FAMILIES] + [(n, o) for n in CENTRED for o in SOFTMAX_MAPS],
                         ids=option_ids)
def test_analog_mode_is_the_ann_and_the_snn_converges_as_one_over_t(name, options):
    """Neurons as identities give the ANN (1e-5); spiking, the error falls roughly as 1/T on the images the
    max thresholds were calibrated on (nothing clipped: the design's convergence property); with the default
    row_max attention map, and on some families also with the softmax map, with and without value centring."""
    ann, size = tiny(name)
    x = images(size, 4, seed=1)
    with torch.no_grad():
        ref = ann(x)
    T = HORIZON.get(name, 64)
    snn = convert(ann, x, timesteps=T, calibration="max", progress=False, step_mode="m", **options)
    with analog_mode(snn.net), torch.no_grad():
        torch.testing.assert_close(snn.net(x), ref, atol=1e-5, rtol=1e-4)
    err = rel_err(snn.simulate(x), ref)
    assert err[T - 1] < 0.1 and err[T - 1] < 0.35 * err[T // 8 - 1] and err[T // 8 - 1] < err[0], \
        (err[0], err[T // 8 - 1], err[T - 1])


def _spike_checks(net):
    """Hooks asserting that every Linear / Conv input and every product operand is k * theta with k in the
    neuron's levels; returns the handles and the list of checked call counts."""
    checked = []

    def check(neuron, what):
        def hook(module, inputs, output):
            k = output / neuron.theta(output)
            assert torch.allclose(k, k.round(), atol=1e-4), what
            assert set(k.round().unique().int().tolist()) <= set(neuron.levels()), what
            checked.append(what)
        return hook

    handles = []
    for name, m in net.named_modules():
        if isinstance(m, SpikingSynapse):
            handles.append(m.neuron.register_forward_hook(check(m.neuron, name)))
        elif isinstance(m, SpikingProduct):
            for n in (m.neuron_a, m.neuron_b):
                handles.append(n.register_forward_hook(check(n, name)))
    return handles, checked


@pytest.mark.parametrize("name", FAMILIES)
def test_spikes_step_mode_and_checkpoint(name, tmp_path):
    """Every Linear input and product operand is a spike (levels=2), step mode equals multi-step mode, and the
    SNN saves and loads back bitwise (rebuilt from the recorded timm name and arguments)."""
    ann, size = tiny(name)
    x = images(size, 4, seed=2)
    snn = convert(ann, x, timesteps=3, levels=2, progress=False)
    assert any(isinstance(m, BaseNeuron) for m in snn.net.modules())
    handles, checked = _spike_checks(snn.net)
    with torch.no_grad():
        step = run_steps(snn.net, x, 3, "s")
    for h in handles:
        h.remove()
    synapses = sum(isinstance(m, SpikingSynapse) for m in snn.net.modules())
    assert synapses > 0 and len(checked) >= 3 * synapses
    with torch.no_grad():
        torch.testing.assert_close(run_steps(snn.net, x, 3, "m"), step, atol=1e-5, rtol=1e-5)
    back = load(save(snn, tmp_path / "snn.safetensors"))
    assert torch.equal(back.simulate(x), snn.simulate(x))


@pytest.mark.parametrize("name", ["swin", "eva02", "levit", "crossvit"])
def test_finetuning_and_the_energy_report_work_on_other_families(name):
    """BPTT lowers the loss; the energy report counts spikes and the analog share."""
    from convert import energy_report, finetune
    from convert.finetune import TimeAveraged
    ann, size = tiny(name)
    x = images(size, 16, seed=3)
    with torch.no_grad():
        y = ann(x).argmax(-1)
    snn = convert(ann, x, timesteps=2, progress=False)

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(TimeAveraged(snn.net, 2)(x), y))

    before = loss()
    try:  # block recomputation works, or is refused with one clear message before anything changes
        finetune(copy.deepcopy(snn), (x, y), epochs=1, batch_size=16, grad_checkpoint=True, progress=False)
    except ValueError as exc:
        assert "set finetune.grad_checkpoint=false" in str(exc)
    finetune(snn, (x, y), epochs=12, batch_size=16, lr=3e-3, warmup=0.0, progress=False)
    assert loss() < 0.98 * before  # levit falls least (1.93 -> 1.89); the others by 10% or more
    report = energy_report(snn, x[:4])
    assert report["snn_sops"] > 0 and 0 < report["analog_share"] < 1


@pytest.mark.parametrize("name", ["swin", "beit"])
@pytest.mark.parametrize("attention", ["ssa", "a2os2a"])
def test_softmax_free_variants_refuse_attention_masks_by_name(name, attention):
    """Shifted-window masks and relative position biases are added before a softmax that ssa / a2os2a do not
    have: refused with the module path, nothing converted silently wrong."""
    from convert import UnsupportedModuleError
    ann, size = tiny(name)
    with pytest.raises(UnsupportedModuleError, match=f"attention={attention} has no softmax to take this "
                                                     "attention's mask"):
        convert(ann, images(size, 2, seed=0), timesteps=2, attention=attention, progress=False)


def _devices(model) -> set:
    """Devices of every parameter, buffer and plain tensor attribute of ``model``'s modules."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return {t.device.type for t in tensors}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_spiking_network_is_built_where_the_ann_is(name):
    """A GPU's ANN gives a GPU's SNN: every module the rewrite adds lives on the ANN's device (the meta device
    stands in for a GPU here; a module left on the CPU would fail there at the first step)."""
    from convert.api import build_spiking
    ann, _ = tiny(name)
    assert _devices(build_spiking(ann.to("meta"), 4, {})) == {"meta"}
