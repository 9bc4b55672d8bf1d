"""The seed papers' attention variants (ssa, a2os2a, psa) and the spike-driven residual style."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from convert import convert, energy_report, finetune, load, save
import importlib
from calibration import analog_mode
from convert.evaluate import evaluate
from convert.finetune import BlockOutputs, Blend, TimeAveraged
from models.neurons import BaseNeuron
from hypothesis import given, settings, strategies as st
from models.attention import SpikeMask, SpikingSDPA
from models.state import run_steps
from tests.conftest import build

ft = importlib.import_module("convert.finetune")  # the module (``convert.finetune`` is also the function)
VARIANT_CONFIGS = ["cls_token", "avg_pool_no_cls", "qk_norm", "register_tokens", "layer_scale", "distilled"]
VARIANTS = [dict(attention="ssa"), dict(attention="a2os2a"), dict(attention="psa", mask_p=0.5),
            dict(attention="psa", mask_p=0.25, mask_operands="q+k", mask_schedule="even", mask_rescale=True),
            dict(residual="spike_driven"), dict(attention="ssa", residual="spike_driven"),
            dict(attention="ssa", norm="constant"), dict(residual="spike_driven", norm="constant"),
            dict(attention_map="softmax"), dict(attention_map="softmax", centre_values=True),
            dict(attention="psa", mask_p=0.25, mask_operands="attn"),
            dict(attention="psa", mask_p=0.25, mask_operands="q+k", mask_schedule="even", mask_rescale=True,
                 mask_fanout=True),
            dict(attention="psa", mask_p=0.5, mask_rescale=True, mask_fanout=True),
            dict(attention="psa", mask_p=0.5, mask_fanout=True, attention_map="softmax", centre_values=True)]
ids = lambda o: "-".join(map(str, o.values()))  # noqa: E731


def _images(n=6, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 16, 16)


def _record(net, modules):
    """Outputs of the given (name, module) pairs at every call."""
    seen = {name: [] for name, _ in modules}
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: seen[name].append(o.detach()))
               for name, m in modules]
    return seen, handles


def _cores(net):
    """(attention core, the attention module holding it) for every attention of the network."""
    return [(m, net.get_submodule(n.rpartition(".")[0])) for n, m in net.named_modules() if isinstance(m, SpikingSDPA)]


def _levels(values, neuron):
    """Integer levels k of a neuron's output k * theta (per-channel thresholds along the last axis)."""
    return values / neuron.theta(values)


def assert_ssa_spikes_binary(snn):
    """Q, K, V binary; the attention output's neuron (before proj) in its own alphabet (the configured neuron:
    the calibrated output map can be negative)."""
    cores = _cores(snn.net)
    neurons = [(f"{i}{r}", getattr(a, f"{r}_neuron")) for i, (a, _) in enumerate(cores) for r in "qkv"]
    neurons += [(f"{i}out", attn.proj.neuron) for i, (_, attn) in enumerate(cores)]
    seen, handles = _record(snn.net, neurons)
    snn.simulate(_images(3))
    for h in handles:
        h.remove()
    for name, neuron in neurons:
        k = torch.cat([_levels(o, neuron).flatten() for o in seen[name]])
        allowed = set(map(float, neuron.levels())) if name.endswith("out") else {0.0, 1.0}
        assert set(torch.round(k).unique().tolist()) <= allowed, name
        torch.testing.assert_close(k, torch.round(k))


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_ssa_spikes_are_binary_at_every_step(config, step_mode):
    assert_ssa_spikes_binary(convert(build(config), _images(), timesteps=4, attention="ssa", step_mode=step_mode,
                                     progress=False))


def assert_a2os2a_value_sets(snn):
    attns = [a for a, _ in _cores(snn.net)]
    mods = [(f"{i}q", a.q_neuron) for i, a in enumerate(attns)] + [(f"{i}k", a.k_act) for i, a in enumerate(attns)] \
        + [(f"{i}v", a.v_neuron) for i, a in enumerate(attns)]
    seen, handles = _record(snn.net, mods)
    snn.simulate(_images(3))
    for h in handles:
        h.remove()
    for i, a in enumerate(attns):
        q = torch.cat([_levels(o, a.q_neuron).flatten() for o in seen[f"{i}q"]])
        v = torch.cat([_levels(o, a.v_neuron).flatten() for o in seen[f"{i}v"]])
        k = torch.cat([o.flatten() for o in seen[f"{i}k"]])
        assert set(torch.round(q).unique().tolist()) <= {0.0, 1.0}
        assert set(torch.round(v).unique().tolist()) <= {-1.0, 0.0, 1.0} and (v != 0).any()
        torch.testing.assert_close(v, torch.round(v))
        assert (k >= 0).all() and (k > 0).any() and not torch.equal(k, torch.round(k))  # real-valued, not spikes


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_a2os2a_value_sets_at_every_step(config, step_mode):
    assert_a2os2a_value_sets(convert(build(config), _images(), timesteps=4, attention="a2os2a", step_mode=step_mode,
                                     progress=False))


class CountSoftmax(TorchFunctionMode):
    """Calls of the attention's exponential: a softmax, or the exp of the row_max map (models.attention)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("softmax", "_softmax", "log_softmax", "exp"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("attention, softmax", [("ssa", False), ("a2os2a", False), ("ecm", True), ("psa", True)])
def test_softmax_runs_only_where_the_variant_keeps_it(attention, softmax, step_mode):
    snn = convert(build("cls_token"), _images(), timesteps=3, attention=attention, step_mode=step_mode,
                  progress=False)
    with CountSoftmax() as mode:
        snn.simulate(_images(2))
    assert (mode.calls > 0) == softmax, mode.calls


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_psa_without_masking_is_ecm_bitwise(config, step_mode):
    x = _images()
    ecm = convert(build(config), x, timesteps=4, step_mode=step_mode, progress=False)
    psa = convert(build(config), x, timesteps=4, attention="psa", mask_p=0.0, step_mode=step_mode, progress=False)
    assert torch.equal(ecm.simulate(x), psa.simulate(x))
    masked = convert(build(config), x, timesteps=4, attention="psa", mask_p=0.5, step_mode=step_mode, progress=False)
    assert not torch.equal(ecm.simulate(x), masked.simulate(x))  # the masks are there, and mask_p=0 turns them off


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("mask_p", [0.25, 0.5, 0.75])
def test_psa_attention_sops_fall_as_one_minus_mask_p(mask_p, fanout):
    x = _images(8)
    ecm = convert(build("cls_token"), x, timesteps=4, progress=False)
    psa = convert(build("cls_token"), x, timesteps=4, attention="psa", mask_p=mask_p, mask_fanout=fanout,
                  progress=False)
    e_ecm, e_psa = energy_report(ecm, x)["layers"], energy_report(psa, x)["layers"]
    for name in [n for n in e_ecm if n.endswith(".qk")]:  # both operands masked
        assert e_psa[name]["sops"] / e_ecm[name]["sops"] == pytest.approx(1 - mask_p, abs=0.08), name
    total = lambda layers: sum(r["sops"] for n, r in layers.items() if n.endswith((".qk", ".av")))  # noqa: E731
    assert total(e_psa) < (1 - mask_p / 3) * total(e_ecm)


@pytest.mark.parametrize("operands, schedule", [("q+k+attn", "random"), ("q", "random"), ("q+k", "even")])
def test_psa_rescaling_is_unbiased_and_free(operands, schedule, mask_p=0.5):
    """Dividing the masked products by 1 - mask_p: the same masks and events (the spikes stay in the
    alphabet, the factor rides on the products' own scaling), and over many mask seeds the attention logits
    average to the unmasked ones, where the unscaled masks shrink them by (1 - mask_p)^(masked operands)."""
    x = _images(4)
    ann = build("cls_token")
    ecm = convert(ann, x, timesteps=1, progress=False)
    kw = dict(attention="psa", mask_p=mask_p, mask_operands=operands, mask_schedule=schedule, progress=False)
    plain = convert(ann, x, timesteps=1, **kw)
    scaled = convert(ann, x, timesteps=1, mask_rescale=True, **kw)
    first = "blocks.0.attn.attend.qk"  # the first product sees the same spikes and masks either way
    assert energy_report(plain, x)["layers"][first]["sops"] == energy_report(scaled, x)["layers"][first]["sops"]

    def logits(snn, seeds):
        core, seen = snn.net.blocks[0].attn.attend, []
        handle = core.softmax.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        for seed in seeds:
            for i, mask in enumerate((core.q_mask, core.k_mask)):
                mask.seed = 2 * seed + i  # an unmasked operand's nn.Identity takes the attribute and ignores it
            snn.simulate(x)
        handle.remove()
        return torch.stack(seen).mean(0)
    ref = logits(ecm, [0])
    seeds = range(100)  # the mean of 100 draws: the scaled logits' relative error is about 0.17 here
    error = {name: float((logits(snn, seeds) - ref).norm() / ref.norm()) for name, snn in
             (("plain", plain), ("scaled", scaled))}
    masked = sum(name in operands.split("+") for name in ("q", "k"))
    assert error["scaled"] < 0.25 and error["plain"] > 1 - (1 - mask_p) ** masked - 0.1, error


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("operands", ["q+k+attn", "q+k", "q", "attn"])
def test_psa_masks_exactly_the_named_operands(operands, fanout):
    """Only the named operands lose spikes: in the first block Q and K see the ecm network's spikes, so Q K^T's
    SOPs equal ecm's when neither is masked and fall when one is."""
    x = _images(8)
    ecm = convert(build("cls_token"), x, timesteps=4, progress=False)
    psa = convert(build("cls_token"), x, timesteps=4, attention="psa", mask_p=0.5, mask_operands=operands,
                  mask_fanout=fanout, progress=False)
    core = psa.net.blocks[0].attn.attend
    names = operands.split("+")
    assert [isinstance(m, SpikeMask) for m in (core.q_mask, core.k_mask, core.attn_mask)] == \
        [n in names for n in ("q", "k", "attn")]
    first = "blocks.0.attn.attend.qk"
    ratio = energy_report(psa, x)["layers"][first]["sops"] / energy_report(ecm, x)["layers"][first]["sops"]
    assert ratio == 1.0 if names == ["attn"] else ratio < 0.9


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.01, 0.99), steps=st.integers(1, 24), seed=st.integers(0, 100))
def test_even_masks_drop_every_element_at_an_evenly_spaced_share(p, steps, seed):
    """schedule=even: after t steps every element has been dropped floor(t p) or ceil(t p) times, for every t."""
    mask = SpikeMask(p, seed, "even")
    like = torch.ones(3, 5, 7)
    dropped = torch.cumsum(torch.stack([1 - mask._mask(like) for _ in range(steps)]), 0)
    t = torch.arange(1, steps + 1, dtype=torch.float64).reshape(-1, 1, 1, 1)
    assert ((dropped >= torch.floor(t * p)) & (dropped <= torch.ceil(t * p))).all()
    mask.reset()
    again = torch.cumsum(torch.stack([1 - mask._mask(like) for _ in range(steps)]), 0)
    assert torch.equal(dropped, again)  # the phases are drawn again from the same seed


def test_psa_masks_repeat_exactly_and_differ_between_steps():
    x = _images(2)
    psa = convert(build("cls_token"), x, timesteps=6, attention="psa", mask_p=0.5, progress=False)
    assert torch.equal(psa.simulate(x), psa.simulate(x))
    masks = []
    mask = psa.net.blocks[0].attn.attend.q_mask
    handle = mask.register_forward_hook(lambda m, i, o: masks.append((o == 0) & (i[0] != 0)))
    psa.simulate(x, timesteps=2)
    handle.remove()
    assert masks[0].any() and not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("schedule", ["random", "even"])
def test_psa_mask_seed_picks_another_draw_of_every_core(schedule):
    """mask_seed=0 is the default draw; another seed draws other masks in every core and operand (each core's
    own seeds stay distinct), the same seed the same masks."""
    x = _images(2)

    def psa(**seed):
        return convert(build("cls_token"), x, timesteps=4, attention="psa", mask_p=0.5, mask_schedule=schedule,
                       progress=False, **seed)

    def masks(snn):
        out = []
        hooks = [m.register_forward_hook(lambda m, i, o: out.append((o == 0) & (i[0] != 0)))
                 for m in snn.net.modules() if isinstance(m, SpikeMask)]
        snn.simulate(x, timesteps=2)
        for h in hooks:
            h.remove()
        return out

    default, zero, one, again = (psa(), psa(mask_seed=0), psa(mask_seed=1), psa(mask_seed=1))
    assert torch.equal(default.simulate(x), zero.simulate(x)) and torch.equal(one.simulate(x), again.simulate(x))
    assert not torch.equal(default.simulate(x), one.simulate(x))
    seeds = [m.seed for snn in (default, one) for m in snn.net.modules() if isinstance(m, SpikeMask)]
    assert len(set(seeds)) == len(seeds)
    assert all(a.any() and not torch.equal(a, b) for a, b in zip(masks(default), masks(one)))


def assert_spike_driven_inputs_binary(snn):
    first = snn.net.patch_embed.proj
    linears = [(n, m) for n, m in snn.net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not first]
    synapses = {m.layer: m.neuron for m in snn.net.modules() if hasattr(m, "layer") and hasattr(m, "neuron")}
    inputs = {n: [] for n, _ in linears}
    handles = [m.register_forward_pre_hook(lambda mod, i, n=n: inputs[n].append(i[0].detach())) for n, m in linears]
    snn.simulate(_images(3))
    for h in handles:
        h.remove()
    for name, layer in linears:
        neuron = synapses[layer]
        k = torch.cat([(x / neuron.theta(x)).flatten() for x in inputs[name]])
        assert set(torch.round(k).unique().tolist()) <= {0.0, 1.0}, name
        torch.testing.assert_close(k, torch.round(k))


@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_spike_driven_converges_to_the_ann_as_t_grows(config):
    """Binary Linear inputs with calibrated offsets keep the negative side of LayerNorm outputs: the error
    falls as T grows (clipped at 0, it stays near the size of the output)."""
    x = _images(8)
    ann = build(config)
    with torch.no_grad():
        ref = ann(x)
    errors = []
    for T in (8, 32, 128):
        out = convert(ann, x, timesteps=T, residual="spike_driven", progress=False).simulate(x)[-1]
        errors.append(float((out - ref).norm() / ref.norm()))
    assert errors[1] < 0.6 * errors[0] and errors[2] < 0.6 * errors[1] and errors[2] < 0.1, errors


def test_spike_driven_without_input_offsets_clips_at_zero():
    x = _images(4)
    on = convert(build("cls_token"), x, timesteps=4, residual="spike_driven", progress=False)
    off = convert(build("cls_token"), x, timesteps=4, residual="spike_driven", input_offsets=False, progress=False)
    offsets = lambda snn: [m.input_offset for m in snn.net.modules() if hasattr(m, "input_offset")]  # noqa: E731
    assert all(o is not None for o in offsets(on)) and all(o is None for o in offsets(off))
    assert "input_offset" in on.calibration_report["blocks.0.attn.qkv.neuron"]


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_spike_driven_every_linear_input_is_binary(config, step_mode):
    assert_spike_driven_inputs_binary(convert(build(config), _images(), timesteps=4, residual="spike_driven",
                                              step_mode=step_mode, progress=False))


@pytest.mark.parametrize("options", VARIANTS, ids=ids)
def test_variants_step_equals_multi_step(options):
    x = _images(4)
    s = convert(build("cls_token"), x, timesteps=5, progress=False, **options)
    with torch.no_grad():
        a = run_steps(s.net, x, 5, "s")
        b = run_steps(s.net, x, 5, "m")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", VARIANTS, ids=ids)
def test_variant_checkpoints_round_trip(options, tmp_path):
    x = _images(4)
    snn = convert(build("cls_token"), x, timesteps=3, progress=False, **options)
    back = load(save(snn, tmp_path / "v.safetensors"))
    assert back.options == snn.options and torch.equal(back.simulate(x), snn.simulate(x))


@pytest.mark.parametrize("attention", ["ssa", "a2os2a"])
def test_products_of_ssa_and_a2os2a_are_additions_only(attention):
    x = _images(4)
    snn = convert(build("cls_token"), x, timesteps=3, attention=attention, progress=False)
    layers = energy_report(snn, x)["layers"]
    products = {n: r for n, r in layers.items() if n.endswith((".qk", ".av"))}
    assert products and all(r.get("macs", 0) == 0 and r["sops"] > 0 for r in products.values())
    if attention == "ssa":  # binary spikes on one side of each product: additions also under strict counting
        assert all(r.get("strict_macs", 0) == 0 for r in products.values())
    # the calibrated output map: one MAC per element per step, counted in both accountings
    elements = []
    hook = snn.net.blocks[0].attn.attend.affine.register_forward_hook(lambda m, i, o: elements.append(o.numel()))
    maps = energy_report(snn, x)["layers"]["blocks.0.attn.attend.affine"]
    hook.remove()
    assert maps["macs"] == maps["strict_macs"] == pytest.approx(sum(elements) / len(x)) and maps["macs"] > 0


@pytest.mark.parametrize("options", VARIANTS, ids=ids)
def test_finetuning_lowers_the_loss_of_every_variant(options):
    x = _images(32, seed=4)
    ann = build("cls_token")
    with torch.no_grad():
        y = ann(x).argmax(-1)
    snn = convert(ann, x, timesteps=2, progress=False, **options)

    def loss():
        with torch.no_grad():
            return float(nn.functional.cross_entropy(TimeAveraged(snn.net, 2)(x), y))

    before = loss()
    finetune(snn, (x, y), epochs=25, batch_size=32, lr=1e-3, warmup=0.0, progress=False)
    assert loss() < 0.9 * before


# ---- from a softmax ViT to the softmax-free variants: blend schedule, feature distillation -------------------

SOFTMAX_FREE = [dict(attention="ssa"), dict(attention="a2os2a"), dict(residual="spike_driven"),
                dict(residual="spike_driven", norm="constant")]
VALUE_SETS = {"ssa": assert_ssa_spikes_binary, "a2os2a": assert_a2os2a_value_sets,
              "spike_driven": assert_spike_driven_inputs_binary}


@pytest.mark.parametrize("options", VARIANTS, ids=ids)
@pytest.mark.parametrize("config", ["cls_token", "avg_pool_no_cls"])
def test_analog_mode_is_the_ann(options, config):
    """Calibration, the reference and the distillation teacher see the ANN, whatever the variant replaces."""
    x = _images(4)
    ann = build(config)
    snn = convert(ann, x, timesteps=2, progress=False, **options)
    teacher = ft._teacher(snn)
    with torch.no_grad(), analog_mode(teacher, exact=True):
        torch.testing.assert_close(teacher(x), ann(x), rtol=1e-4, atol=1e-4)
    assert evaluate(snn, [(x, ann(x).argmax(-1))], 1, progress=False)["ann_top1"] == 100.0


@pytest.mark.parametrize("attention", ["ssa", "a2os2a"])
@pytest.mark.parametrize("config", ["cls_token", "register_tokens"])
def test_output_map_is_the_least_squares_fit_to_the_ann_attention(attention, config):
    """Per channel, gain * b + shift with b the variant's mean output over T is the least-squares fit of the ANN's
    attention output: moving either away raises the error, and the fit beats the paper's plain output."""
    x = _images(8)
    snn = convert(build(config), x, timesteps=3, attention=attention, progress=False)
    for core, _ in _cores(snn.net):
        seen = {}
        hooks = [core.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o)),
                 core.affine.register_forward_hook(lambda m, i, o: seen.__setitem__("b", i[0]))]
        with torch.no_grad():
            with analog_mode(snn.net):
                snn.net(x)
            a = seen.pop("a")
            run_steps(snn.net, x, 3, "m")
        for h in hooks:
            h.remove()
        b = seen["b"].reshape(3, *a.shape).mean(0)
        gain, shift = core.affine.out_gain.detach(), core.affine.out_shift.detach()

        def error(g, s):
            return float(((g * b + s - a) ** 2).sum())

        best = error(gain, shift)
        scale = float(b.abs().mean()) + 1e-3
        for dg, ds in [(0.05 * gain.abs().mean(), 0), (-0.05 * gain.abs().mean(), 0), (0, 0.05 * scale),
                       (0, -0.05 * scale)]:
            assert error(gain + dg, shift + ds) > best
        plain = error(torch.ones_like(gain), torch.zeros_like(shift))
        assert best < plain


@pytest.mark.parametrize("options", SOFTMAX_FREE + [{}], ids=ids)
@pytest.mark.parametrize("config", ["cls_token", "avg_pool_no_cls"])
def test_blend_at_zero_is_the_ann(options, config):
    """lambda = 0: every neuron passes its input and every softmax-free core computes the softmax attention, so
    each step of the spiking network outputs the ANN's logits; lambda = 1 is the variant itself."""
    x = _images(4)
    ann = build(config)
    snn = convert(ann, x, timesteps=3, progress=False, **options)
    blend = Blend(snn.net, [m for m in snn.net.modules() if isinstance(m, BaseNeuron)])
    with torch.no_grad():
        blend.set(0.0)
        steps = run_steps(snn.net, x, 3, "m")
        blend.remove()
        torch.testing.assert_close(steps, ann(x).expand_as(steps), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(snn.simulate(x), ann(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("options", SOFTMAX_FREE, ids=ids)
def test_blended_finetuning_ends_in_the_pure_variant(options, tmp_path):
    """The softmax attention fades out during fine-tuning (softmax calls while lambda < 1) and none is left
    after it; the variant's value sets hold; the fine-tuned network saves and reloads bitwise."""
    x, y = _images(32, seed=4), torch.randint(0, 7, (32,))
    snn = convert(build("cls_token"), x, timesteps=2, progress=False, **options)
    with CountSoftmax() as during:
        finetune(snn, (x, y), epochs=4, batch_size=16, blend=0.75, progress=False)  # labels only: no ANN teacher
    with CountSoftmax() as after:
        out = snn.simulate(x)
    variant = options.get("attention", options.get("residual"))
    assert (after.calls == 0) == (variant != "spike_driven") and during.calls > 0
    VALUE_SETS[variant](snn)
    back = load(save(snn, tmp_path / "ft.safetensors"))
    assert torch.equal(back.simulate(x), out)


@pytest.mark.parametrize("options, config", [({}, "avg_pool_no_cls"), (dict(attention="ssa"), "cls_token")],
                         ids=["ecm-avg_pool_no_cls", "ssa-cls_token"])
def test_feature_distillation_brings_the_blocks_toward_the_ann(options, config):
    """Training with the block-output term lowers it, and more than the same training without it (random-weight
    ViTs, distillation of the logits in both)."""
    x = _images(32, seed=5)

    def distance(snn, teacher):
        taps = BlockOutputs(snn.net), BlockOutputs(teacher)
        with torch.no_grad():
            TimeAveraged(snn.net, 2)(x)
            with analog_mode(teacher, exact=True):
                teacher(x)
        for t in taps:
            t.remove()
        return float(ft.feature_loss(taps[0].take(), taps[1].take()))

    after = {}
    for weight in (0.0, 100.0):
        snn = convert(build(config), x, timesteps=2, progress=False, **options)
        teacher = ft._teacher(snn)  # the ANN
        before = distance(snn, teacher)
        finetune(snn, x, epochs=15, batch_size=32, distill=1.0, feature_distill=weight, lr=1e-3, warmup=0.0,
                 progress=False)
        after[weight] = distance(snn, teacher)
    assert after[100.0] < 0.9 * min(before, after[0.0]), (before, after)


# ---- the row_max attention map -------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 6), n=st.integers(1, 7), d=st.integers(1, 5), scale=st.floats(1, 10),
       floor=st.sampled_from([0.5, 0.375]), seed=st.integers(0, 2 ** 16), step_mode=st.sampled_from("sm"))
def test_row_normalisation_is_the_ratio_of_the_running_means(steps, n, d, scale, floor, seed, step_mode):
    """For any map stream P(t) (a spiking one: signed, rows summing to anything) and value stream V(t), the
    outputs of (P V) then RowNormalisation sum over t steps to t (mean_P mean_V) / max(mean_P 1, floor) at every t,
    in step and multi-step mode, and a positive scale of the map changes nothing while its row sums stay above
    the floor (a ratio: psa's rescaling of the map is not needed)."""
    from models.attention import RowNormalisation
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randint(-1, 3, (steps, 2, n, n), generator=gen).float()
    v = torch.randn(steps, 2, n, d, generator=gen)

    def outputs(a):
        core = SpikingSDPA("ecm", lambda signed: BaseNeuron())
        core.normalise = RowNormalisation(floor)
        for m in (core.av, core.normalise.divide):
            m.step_mode, m.timesteps = step_mode, steps
        if step_mode == "m":
            x, y = a.flatten(0, 1), v.flatten(0, 1)
            return core.normalise(core.av(x, y), x).reshape(steps, 2, n, d)
        return torch.stack([core.normalise(core.av(a[t], v[t]), a[t]) for t in range(steps)])

    out = outputs(attn)
    t = torch.arange(1, steps + 1, dtype=torch.float32).reshape(-1, 1, 1, 1)
    mean_a, mean_v = attn.cumsum(0) / t, v.cumsum(0) / t
    want = (mean_a @ mean_v) / mean_a.sum(-1, keepdim=True).clamp_min(floor)
    torch.testing.assert_close(out.cumsum(0) / t, want, atol=1e-4, rtol=1e-4)
    positive = attn.abs() + 1.0  # row sums >= 1 >= floor, also once scaled by >= 1
    torch.testing.assert_close(outputs(positive * scale), outputs(positive), atol=1e-4, rtol=1e-4)


def test_row_max_map_peaks_at_one_in_every_row_and_uses_a_signed_neuron():
    """The row_max map's neuron sees exp(s - max_k s) in analog mode (every row's largest entry exactly 1, all in
    (0, 1]) and is signed (a later step can take back an early spike); the softmax map's is unsigned."""
    x = _images(4)
    snn = convert(build("cls_token"), x, timesteps=4, progress=False)
    core = snn.net.blocks[0].attn.attend
    assert core.attn_neuron.signed and core.normalise is not None
    seen = []
    hook = core.attn_neuron.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with analog_mode(snn.net), torch.no_grad():
        snn.net(x)
    hook.remove()
    p = seen[0]
    assert p.min() > 0 and p.max() <= 1
    torch.testing.assert_close(p.amax(-1), torch.ones_like(p.amax(-1)))
    softmax = convert(build("cls_token"), x, timesteps=4, attention_map="softmax", progress=False)
    assert not softmax.net.blocks[0].attn.attend.attn_neuron.signed


def test_checkpoints_from_before_the_map_option_load_with_the_softmax_map(tmp_path):
    """A file whose options predate ``attention_map`` was a softmax-map conversion: it loads as one, bitwise."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    x = _images(4)
    snn = convert(build("cls_token"), x, timesteps=3, attention_map="softmax", progress=False)
    save(snn, tmp_path / "snn.safetensors")
    with safe_open(str(tmp_path / "snn.safetensors"), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["options"]["attention_map"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "config": json.dumps(config)})
    old = load(tmp_path / "old.safetensors")
    assert old.options["attention_map"] == "softmax"
    torch.testing.assert_close(old.simulate(x), snn.simulate(x), atol=0, rtol=0)


# ---- value centring ------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 6), n=st.integers(1, 7), d=st.integers(1, 5), gain=st.sampled_from([1.0, 4 / 3, 2.0]),
       shift=st.floats(-5, 5), seed=st.integers(0, 2 ** 16), step_mode=st.sampled_from("sm"))
def test_centred_attention_moves_with_a_constant_added_to_the_values(steps, n, d, gain, shift, seed, step_mode):
    """A V + c = A (V + c) for a row-stochastic A: with the centring, g A' V + (1 - g A' 1) mean(V) moves by
    exactly c at every step for any map stream A' (not row-stochastic: a spiking map) and gain g, where g A' V
    alone moves by g A' 1 c."""
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randint(0, 3, (steps, 2, n, n), generator=gen).float() * 0.25  # a spiking map, rows sum to anything
    v = torch.randn(steps, 2, n, d, generator=gen)

    def outputs(values):
        core = SpikingSDPA("ecm", lambda signed: BaseNeuron(), centre_values=True, attention_map="softmax")
        for m in (core.av, core.centring.product):
            m.step_mode, m.timesteps = step_mode, steps
        if step_mode == "m":
            a, b = attn.flatten(0, 1), values.flatten(0, 1)
            return (core.av(a, b) * gain + core.centring(a, b, gain)).reshape(steps, 2, n, d)
        return torch.stack([core.av(attn[t], values[t]) * gain + core.centring(attn[t], values[t], gain)
                            for t in range(steps)])

    moved = outputs(v + shift) - outputs(v)
    torch.testing.assert_close(moved, torch.full_like(moved, shift), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options, part, operands, inner", [
    ({}, "normalise", (1,), "divide"),
    (dict(centre_values=True, attention_map="softmax"), "centring", (0, 1), "product")], ids=["row_max", "centring"])
def test_attention_map_sums_count_their_additions(options, part, operands, inner):
    """Energy, hand count: the row_max normalisation's row sums of the map, and the centring's row sums of the map
    and mean of the values, are one addition per non-zero element; the division (one per output element) and
    the centring's outer product of the deficit [N, 1] and the mean [1, d] are N d MACs per head and step."""
    x = _images(4)
    T = 3
    snn = convert(build("cls_token"), x, timesteps=T, progress=False, **options)
    core = snn.net.blocks[0].attn.attend
    seen = []

    def record(module, inputs, output):  # spiking steps only (the report also runs the ANN once)
        if not core.attn_neuron.analog:
            seen.append((sum(int(inputs[i].count_nonzero()) for i in operands), output.numel()))
    hook = getattr(core, part).register_forward_hook(record)
    layers = energy_report(snn, x[:2], timesteps=T)["layers"]
    hook.remove()
    assert len(seen) == T
    adds, macs = sum(a for a, _ in seen) / 2, sum(n for _, n in seen) / 2
    name = f"blocks.0.attn.attend.{part}"
    assert layers[name]["sops"] == pytest.approx(adds) and adds > 0
    assert layers[name]["strict_sops"] == pytest.approx(adds)
    ops = layers[f"{name}.{inner}"]
    assert ops["macs"] == ops["strict_macs"] == pytest.approx(macs)
    assert ("ann_macs" in ops) == (part == "normalise")  # the ANN divides too; it has no centring


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(attention="linear"), "unknown attention.name 'linear': use one of ecm, psa, ssa, a2os2a"),
    (dict(residual="dense"), "unknown attention.residual 'dense': use one of membrane, spike_driven"),
    (dict(attention="psa", mask_p=1.0), r"attention.mask_p must be a finite number in \[0, 1\), got 1.0"),
    (dict(attention="psa", mask_p=-0.1), r"in \[0, 1\)"),
    (dict(attention="psa", mask_p="half"), r"in \[0, 1\)"),
    (dict(mask_p=0.3), "applies to attention=psa only"),
    (dict(mask_rescale=True), "attention.mask_rescale=True applies to attention=psa only"),
    (dict(mask_operands="q"), "attention.mask_operands=q applies to attention=psa only"),
    (dict(mask_schedule="even"), "attention.mask_schedule=even applies to attention=psa only"),
    (dict(mask_fanout=True), "attention.mask_fanout=True applies to attention=psa only"),
    (dict(attention="psa", mask_p=0.2, mask_fanout="maybe"), "attention.mask_fanout must be true or false"),
    (dict(mask_seed=1), "attention.mask_seed=1 applies to attention=psa only"),
    (dict(attention="psa", mask_p=0.2, mask_seed=-1), "attention.mask_seed must be an integer in 0..1099511627776"),
    (dict(attention="psa", mask_p=0.2, mask_operands="v"), "unknown attention.mask_operands 'v': use one of q"),
    (dict(attention="psa", mask_p=0.2, mask_schedule="sobol"), "unknown attention.mask_schedule 'sobol'"),
    (dict(attention="ssa", centre_values=True), "attention.centre_values=true applies to attention=ecm or psa"),
    (dict(centre_values=True), "attention.centre_values=true applies to attention.map=softmax"),
    (dict(attention="ssa", attention_map="softmax"), "attention.map=softmax applies to attention=ecm or psa"),
    (dict(attention_map="probabilities"), "unknown attention.map 'probabilities': use one of row_max, softmax"),
    (dict(attention="a2os2a", levels=4), "attention=a2os2a uses binary Q and ternary V"),
    (dict(attention="ssa", neuron="multi_threshold", levels=1), "attention=ssa uses binary Q, K, V"),
    (dict(residual="spike_driven", levels=2), "residual=spike_driven uses binary inputs"),
])
def test_bad_variant_options(options, message):
    with pytest.raises(ValueError, match=message):
        convert(build("cls_token"), _images(), timesteps=2, progress=False, **options)


@pytest.mark.parametrize("options", VARIANTS + [dict(neuron=n) for n in ("if", "multi_threshold", "ternary")]
                         + [dict(coding="differential", hysteresis=0.5)], ids=ids)
def test_every_variant_is_built_where_the_ann_is(options):
    """Every module the rewrite adds (neurons, compensations, masks, norms) lives on the ANN's device (the meta
    device stands in for a GPU)."""
    from convert.api import build_spiking
    from tests.test_families import _devices
    assert _devices(build_spiking(build("cls_token").to("meta"), 4, options)) == {"meta"}
