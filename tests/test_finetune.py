"""Fine-tuning over T: gradients, learning, exact resume, checkpoints, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from calibration import analog_mode
from convert import convert, finetune, load, save
from convert.finetune import TimeAveraged
from models.neurons import BaseNeuron, Surrogate
from models.state import reset_net, run_steps
from tests.conftest import build

NEURON_SETTINGS = [dict(neuron="signed_if"), dict(neuron="signed_if", levels=3), dict(neuron="if"),
                   dict(neuron="multi_threshold", levels=4), dict(neuron="ternary"),
                   dict(neuron="signed_if", levels=2, coding="differential", hysteresis=0.5)]


def _data(n=48, seed=3):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 16, 16), torch.randint(0, 7, (n,))


def _snn(config="cls_token", T=2, **options):
    x, _ = _data()
    return convert(build(config), x, timesteps=T, progress=False, **options)


def _state(snn):
    return {k: v.clone() for k, v in snn.net.state_dict().items()}


def _set_surrogate(net, surrogate):
    for m in net.modules():
        if isinstance(m, BaseNeuron):
            m.surrogate = surrogate


@pytest.mark.parametrize("surrogate", Surrogate.KINDS)
@pytest.mark.parametrize("options", NEURON_SETTINGS, ids=lambda o: "-".join(map(str, o.values())))
def test_gradients_reach_thresholds_and_weights(options, surrogate):
    snn = _snn(**options)
    x, y = _data(8)
    params = list(snn.net.parameters())
    for p in params:
        p.requires_grad_(True)
    _set_surrogate(snn.net, Surrogate(surrogate))
    torch.nn.functional.cross_entropy(TimeAveraged(snn.net, 3)(x), y).backward()
    neurons = [m for m in snn.net.modules() if isinstance(m, BaseNeuron)]
    with_grad = [n for n in neurons if n.threshold.grad is not None and n.threshold.grad.abs().sum() > 0]
    assert all(n.threshold.grad is None or n.threshold.grad.isfinite().all() for n in neurons)
    assert len(with_grad) >= 0.8 * len(neurons), f"{len(with_grad)}/{len(neurons)} thresholds got a gradient"
    for name in ("blocks.0.attn.qkv.layer.weight", "blocks.0.mlp.fc1.layer.weight", "blocks.1.mlp.fc2.layer.weight",
                 "patch_embed.proj.weight", "head.layer.weight"):
        grad = snn.net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("surrogate", Surrogate.KINDS)
@pytest.mark.parametrize("options", NEURON_SETTINGS, ids=lambda o: "-".join(map(str, o.values())))
def test_surrogate_leaves_the_forward_values_unchanged(options, surrogate):
    snn = _snn(**options)
    x, _ = _data(4)
    with torch.no_grad():
        plain = run_steps(snn.net, x, 3, "m")
    _set_surrogate(snn.net, Surrogate(surrogate))
    for p in snn.net.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        trained = run_steps(snn.net, x, 3, "m")
    assert torch.equal(plain, trained.detach())


def test_multi_step_neuron_matches_step_mode_under_gradients():
    snn = _snn(neuron="signed_if", levels=2)
    snn.net.double()  # float64: the two paths sum the gradient's terms in different orders
    x = _data(4)[0].double()
    _set_surrogate(snn.net, Surrogate("sigmoid"))
    for p in snn.net.parameters():
        p.requires_grad_(True)
    step = run_steps(snn.net, x, 3, "s").sum()
    multi = run_steps(snn.net, x, 3, "m").sum()
    g_step = torch.autograd.grad(step, list(snn.net.parameters()), allow_unused=True)
    g_multi = torch.autograd.grad(multi, list(snn.net.parameters()), allow_unused=True)
    for a, b in zip(g_step, g_multi):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("config", ["cls_token", "avg_pool_no_cls", "qk_norm", "layer_scale", "distilled", "relu_mlp"])
def test_loss_falls_over_a_few_steps(config):
    x, _ = _data(32)
    with torch.no_grad():
        y = build(config)(x).argmax(-1)  # the ANN's own predictions: a target the SNN can reach
    snn = _snn(config, T=2)

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(TimeAveraged(snn.net, 2)(x), y))

    before = loss()
    finetune(snn, (x, y), epochs=25, batch_size=32, lr=1e-3, warmup=0.0, progress=False)
    assert loss() < 0.8 * before, (before, loss(), snn.finetune_report["loss"])


def test_finetuning_changes_the_snn_and_restores_its_modes():
    snn = _snn(step_mode="s")
    before = _state(snn)
    flags = {n: p.requires_grad for n, p in snn.net.named_parameters()}
    finetune(snn, _data(32), epochs=1, batch_size=16, progress=False)
    after = _state(snn)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("threshold"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert flags == {n: p.requires_grad for n, p in snn.net.named_parameters()}
    assert not snn.net.training
    assert all(m.surrogate is None and m.step_mode == "s" and m.u is None
               for m in snn.net.modules() if isinstance(m, BaseNeuron))


def test_thresholds_only_keeps_weights():
    snn = _snn()
    before = _state(snn)
    finetune(snn, _data(32), epochs=1, batch_size=16, weights=False, progress=False)
    after = _state(snn)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("threshold"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("threshold"))


def test_zero_epochs_leave_the_snn_unchanged():
    snn = _snn()
    before = _state(snn)
    assert finetune(snn, _data(), epochs=0) is snn
    assert all(torch.equal(before[k], v) for k, v in snn.net.state_dict().items())
    assert snn.finetune_report is None


def test_grad_checkpoint_gives_the_same_result():
    a, b = _snn(), _snn()
    finetune(a, _data(32), epochs=1, batch_size=16, progress=False)
    finetune(b, _data(32), epochs=1, batch_size=16, grad_checkpoint=True, progress=False)
    for k, v in a.net.state_dict().items():
        torch.testing.assert_close(v, b.net.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_distillation_alone_needs_no_labels_and_moves_toward_the_ann():
    """With distill=1 the loss is tau^2 KL(softmax(ANN / tau) || softmax(SNN / tau)), the ANN being the original
    timm model (not the SNN, not a shuffled batch), and training on it lowers it."""
    import sys
    ft = sys.modules["convert.finetune"]
    ann = build("cls_token")
    snn = _snn(T=1)
    images = _data(32)[0]
    logits = torch.randn(32, 7)
    o = {"distill": 1.0, "temperature": 2.0}
    with torch.no_grad():
        target = torch.softmax(ann(images) / 2.0, -1)
    expected = 4.0 * (target * (target.log() - torch.log_softmax(logits / 2.0, -1))).sum(-1).mean()
    torch.testing.assert_close(ft._loss(logits, None, ft._teacher(snn), images, o), expected, rtol=1e-4, atol=1e-5)
    # per-epoch losses of two batches each are noisy: the last three epochs' mean against the first epoch
    finetune(snn, images, epochs=12, batch_size=16, distill=1.0, lr=3e-3, warmup=0.0, progress=False)
    loss = snn.finetune_report["loss"]
    assert sum(loss[-3:]) / 3 < loss[0], loss


@pytest.mark.parametrize("options", [{}, dict(coding="differential", levels=2)])
def test_event_penalty_lowers_the_firing_rate(options):
    """The same fine-tuning with a penalty on events per neuron per step ends with fewer events (the rate's
    gradient is small beside the cross-entropy's: weights near a thousand move it within 10 steps)."""
    from convert.energy import energy_report
    x, y = _data(32)
    rates = {}
    for penalty in (0.0, 1000.0):
        snn = _snn(T=4, **options)
        finetune(snn, (x, y), epochs=10, batch_size=32, lr=1e-2, warmup=0.0, event_penalty=penalty, progress=False)
        r = energy_report(snn, x)["firing_rates"]
        rates[penalty] = sum(r.values()) / len(r)
    assert rates[1000.0] < 0.93 * rates[0.0], rates


def test_event_meter_counts_what_the_neurons_send():
    """The penalty's count equals energy_report's events per neuron per step (both codings)."""
    from convert.energy import energy_report
    from convert.finetune import EventMeter
    x, _ = _data(8)
    for options in ({}, dict(coding="differential", levels=3)):
        snn = _snn(T=3, **options)
        neurons = [m for m in snn.net.modules() if isinstance(m, BaseNeuron)]
        meter = EventMeter(neurons)
        with torch.no_grad():
            TimeAveraged(snn.net, 3)(x)
        counted = float(meter.rate())
        meter.remove()
        layers = energy_report(snn, x)["layers"]
        sizes = {}
        hooks = [n.register_forward_hook(lambda m, i, o, k=k: sizes.__setitem__(k, o.numel())) for k, n in
                 ((k, n) for k, n in snn.net.named_modules() if isinstance(n, BaseNeuron))]
        with torch.no_grad():
            TimeAveraged(snn.net, 3)(x)
        for h in hooks:
            h.remove()
        total = sum(layers[k]["firing_rate"] * sizes[k] for k in sizes)
        assert counted == pytest.approx(total / sum(sizes.values()), rel=1e-5)


def test_smaller_training_T_than_evaluation_T():
    snn = _snn(T=8)
    finetune(snn, _data(16), epochs=1, batch_size=16, timesteps=2, progress=False)
    assert snn.finetune_report["timesteps"] == 2 and snn.timesteps == 8
    assert snn.simulate(_data(2)[0]).shape[0] == 8


class Interrupted(Exception):
    pass


class Batches:
    """A sized iterable of (images, labels) batches that can fail at one batch, like a killed job."""

    def __init__(self, data, batch_size, fail_at=None):
        self.x, self.y = data
        self.batch_size, self.fail_at = batch_size, fail_at

    def __len__(self):
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for i in range(len(self)):
            if i == self.fail_at:
                raise Interrupted()
            yield self.x[i * self.batch_size:(i + 1) * self.batch_size], self.y[i * self.batch_size:(i + 1) * self.batch_size]


class FailingDataset(Dataset):
    def __init__(self, data, fail_after=None):
        self.x, self.y = data
        self.fail_after, self.calls = fail_after, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupted()
        return self.x[i], self.y[i]


@pytest.mark.parametrize("kind", ["dataset", "batches"])
@pytest.mark.parametrize("options", [{}, dict(distill=0.5), dict(blend=0.5, feature_distill=1.0)],
                         ids=lambda o: "-".join(map(str, o)))
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, kind, options):
    data = _data(40)
    common = dict(epochs=3, batch_size=8, lr=1e-3, progress=False, **options)
    full = _snn()
    finetune(full, FailingDataset(data) if kind == "dataset" else Batches(data, 8), **common)

    killed = _snn()
    ckpt = tmp_path / "ft.safetensors"
    broken = FailingDataset(data, fail_after=8 * 7 + 3) if kind == "dataset" else Batches(data, 8, fail_at=2)
    with pytest.raises(Interrupted):
        # the dataset dies in batch 3 of epoch 2 (checkpoint: step 6); the batches in batch 3 of epoch 1 (step 2)
        finetune(killed, broken, checkpoint_every=2, checkpoint_path=ckpt, **common)
    assert ckpt.is_file() and not list(tmp_path.glob(".*tmp"))

    resumed = _snn()
    finetune(resumed, FailingDataset(data) if kind == "dataset" else Batches(data, 8), resume=ckpt, **common)
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    assert resumed.finetune_report["loss"] == pytest.approx(full.finetune_report["loss"], rel=1e-6)


def test_max_steps_then_resume_equals_one_run(tmp_path):
    data = _data(32)
    full = _snn()
    finetune(full, data, epochs=2, batch_size=8, progress=False)
    part = _snn()
    ckpt = tmp_path / "ft.safetensors"
    finetune(part, data, epochs=2, batch_size=8, max_steps=5, checkpoint_path=ckpt, progress=False)
    assert part.finetune_report["steps"] == 5 and not part.finetune_report["complete"]
    rest = _snn()
    finetune(rest, data, epochs=2, batch_size=8, resume=ckpt, checkpoint_path=ckpt, progress=False)
    assert rest.finetune_report["complete"]
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, rest.net.state_dict()[k]), k


def test_a_checkpoint_from_before_the_fanout_and_seed_options_resumes(tmp_path):
    """A fine-tuning checkpoint whose options predate mask_fanout and mask_seed did what their defaults do now:
    the run resumes from it (its options are read with those values) and ends as one uninterrupted run."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    data = _data(32)
    full = _snn()
    finetune(full, data, epochs=2, batch_size=8, progress=False)
    ckpt = tmp_path / "ft.safetensors"
    finetune(_snn(), data, epochs=2, batch_size=8, max_steps=5, checkpoint_path=ckpt, progress=False)
    with safe_open(str(ckpt), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    for key in ("mask_fanout", "mask_seed"):
        del config["options"][key]
    save_file(tensors, str(ckpt), metadata={**meta, "config": json.dumps(config)})
    rest = _snn()
    finetune(rest, data, epochs=2, batch_size=8, resume=ckpt, progress=False)
    assert rest.finetune_report["complete"]
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, rest.net.state_dict()[k]), k


def test_resume_with_a_teacher_refuses_another_starting_network(tmp_path):
    """The distillation teacher is the network passed in: resuming into the fine-tuned network itself (whose
    exact analog mode is no longer the ANN) is refused; a fresh conversion resumes."""
    data = _data(32)
    common = dict(epochs=2, batch_size=8, distill=0.5, progress=False)
    snn = _snn()
    ckpt = tmp_path / "ft.safetensors"
    finetune(snn, data, max_steps=3, checkpoint_path=ckpt, **common)
    before = {k: v.clone() for k, v in snn.net.state_dict().items()}
    with pytest.raises(ValueError, match="not the one this fine-tuning started from"):
        finetune(snn, data, resume=ckpt, **common)
    assert all(torch.equal(v, before[k]) for k, v in snn.net.state_dict().items())  # left unchanged
    fresh = _snn()
    finetune(fresh, data, resume=ckpt, **common)
    assert fresh.finetune_report["complete"]


def test_finetuned_checkpoint_loads_and_evaluates(tmp_path):
    snn = _snn(T=3)
    ckpt = tmp_path / "ft.safetensors"
    finetune(snn, _data(16), epochs=1, batch_size=8, checkpoint_path=ckpt, progress=False)
    for path in (ckpt, save(snn, tmp_path / "final.safetensors")):
        back = load(path)
        x = _data(4)[0]
        assert torch.equal(back.simulate(x), snn.simulate(x))
        assert back.finetune_report["steps"] == 2


# ---- bad input ---------------------------------------------------------------------------------------------

def test_labels_missing():
    with pytest.raises(ValueError, match="no labels"):
        finetune(_snn(), _data()[0], epochs=1, progress=False)
    with pytest.raises(ValueError, match="no labels"):
        finetune(_snn(), [(_data()[0],)], epochs=1, progress=False)


@pytest.mark.parametrize("batch, message", [
    ((torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), "pixels"),
    ((torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), "channels"),
    ((torch.randn(4, 16, 16), torch.zeros(4, dtype=torch.long)), r"\[batch, channels"),
    ((torch.randn(4, 3, 16, 16), torch.zeros(3, dtype=torch.long)), "labels must be an integer tensor"),
    ((torch.randn(4, 3, 16, 16), torch.zeros(4)), "labels must be an integer tensor"),
    ((torch.randn(4, 3, 16, 16), torch.full((4,), 9)), "class indices in 0..6"),
    ((torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), 1), "must be \\(images, labels\\)"),
])
def test_loader_with_wrong_shapes(batch, message):
    snn = _snn()
    before = _state(snn)
    with pytest.raises(ValueError, match=message):
        finetune(snn, [batch], epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in snn.net.state_dict().items())


@pytest.mark.parametrize("options, message", [
    (dict(lr=0), r"finetune.lr must be a finite number in \(0, 10\]"), (dict(lr=-1e-3), "finetune.lr must be"),
    (dict(threshold_lr=0.0), "finetune.threshold_lr must be"), (dict(warmup=1.0), "warmup"),
    (dict(batch_size=0), "batch_size"), (dict(distill=1.5), "distill"), (dict(surrogate="tanh"), "surrogate"),
    (dict(alpha=0), "alpha"), (dict(thresholds=False, weights=False), "nothing to train"),
    (dict(checkpoint_every=5), "checkpoint_path"), (dict(timesteps=0), "timesteps"),
    (dict(learning_rate=1e-3), "unknown finetune option"), (dict(epochs_=1), "unknown finetune option"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        finetune(_snn(), _data(), epochs=1, progress=False, **options)


@pytest.mark.parametrize("epochs", [-1, 1.5, True])
def test_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        finetune(_snn(), _data(), epochs=epochs)


def test_resume_from_another_model(tmp_path):
    ckpt = tmp_path / "ft.safetensors"
    finetune(_snn("cls_token"), _data(16), epochs=1, batch_size=8, checkpoint_path=ckpt, progress=False)
    for other in (_snn("qk_norm"), _snn("cls_token", neuron="if")):
        before = _state(other)
        with pytest.raises(ValueError, match="another conversion"):
            finetune(other, _data(16), epochs=1, batch_size=8, resume=ckpt, progress=False)
        assert all(torch.equal(before[k], v) for k, v in other.net.state_dict().items())
    with pytest.raises(ValueError, match="other fine-tuning options"):
        finetune(_snn("cls_token"), _data(16), epochs=1, batch_size=8, lr=1e-2, resume=ckpt, progress=False)
    plain = save(_snn("cls_token"), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no fine-tuning state"):
        finetune(_snn("cls_token"), _data(16), epochs=1, batch_size=8, resume=plain, progress=False)
    with pytest.raises(FileNotFoundError):
        finetune(_snn("cls_token"), _data(16), epochs=1, resume=tmp_path / "missing.safetensors", progress=False)


def test_not_a_spiking_model():
    with pytest.raises(ValueError, match="SpikingModel"):
        finetune(build("cls_token"), _data(), epochs=1)


def test_diverging_loss_is_named():
    snn = _snn()
    x, y = _data(16)
    with pytest.raises(FloatingPointError, match="lower finetune lr"):
        finetune(snn, (x * 1e30, y), epochs=1, progress=False)
    reset_net(snn.net)


class RecordingDataset(Dataset):
    """Remembers every index it hands out."""

    def __init__(self, data):
        self.x, self.y = data
        self.seen = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def _interrupted_checkpoint(tmp_path, data, **common):
    """A checkpoint written at step 3 of 5 by a run that then died; returns its path and the data order."""
    ckpt = tmp_path / "ft.safetensors"
    finetune(_snn(), data, max_steps=3, checkpoint_path=ckpt, **common)
    return ckpt


def test_resume_runs_only_the_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """Steps before the checkpoint are not run again: the resumed run fetches only the remaining images and
    takes only the remaining optimiser steps."""
    import sys
    ft = sys.modules["convert.finetune"]
    data = _data(40)
    common = dict(epochs=1, batch_size=8, lr=1e-3, progress=False)
    full_data = RecordingDataset(data)
    finetune(_snn(), full_data, **common)
    ckpt = _interrupted_checkpoint(tmp_path, data, **common)
    steps = []
    train_step = ft._train_step
    monkeypatch.setattr(ft, "_train_step", lambda *a, **k: steps.append(1) or train_step(*a, **k))
    resumed_data = RecordingDataset(data)
    finetune(_snn(), resumed_data, resume=ckpt, **common)
    assert len(steps) == 2
    assert resumed_data.seen == full_data.seen[3 * 8:]  # exactly the batches after step 3, in the same order


def test_resume_restores_the_optimiser_state(tmp_path):
    """The final checkpoint of a resumed run holds AdamW's step count of the whole run, and its moments equal
    an uninterrupted run's."""
    from safetensors.torch import load_file
    data = _data(40)
    common = dict(epochs=1, batch_size=8, lr=1e-3, progress=False)
    full_ckpt = tmp_path / "full.safetensors"
    finetune(_snn(), data, checkpoint_path=full_ckpt, **common)
    ckpt = _interrupted_checkpoint(tmp_path, data, **common)
    finetune(_snn(), data, resume=ckpt, checkpoint_path=ckpt, **common)
    a, b = load_file(str(full_ckpt)), load_file(str(ckpt))
    optim = [k for k in a if k.startswith("finetune_state/optim/")]
    assert optim and {k for k in b if k.startswith("finetune_state/optim/")} == set(optim)
    assert all(float(b[k]) == 5 for k in optim if k.endswith("/step"))
    for k in optim:
        assert torch.equal(a[k], b[k]), k


def test_resume_starts_from_the_checkpoint_weights(tmp_path):
    """A resumed run continues from the weights in the checkpoint: altering them changes the result."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    data = _data(40)
    common = dict(epochs=1, batch_size=8, lr=1e-3, progress=False)
    full = _snn()
    finetune(full, data, **common)
    ckpt = _interrupted_checkpoint(tmp_path, data, **common)
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.layer.weight"] = tensors["head.layer.weight"] + 0.1
    altered = tmp_path / "altered.safetensors"
    save_file(tensors, str(altered), metadata=meta)
    for path, same in ((ckpt, True), (altered, False)):
        resumed = _snn()
        finetune(resumed, data, resume=path, **common)
        equal = all(torch.equal(v, resumed.net.state_dict()[k]) for k, v in full.net.state_dict().items())
        assert equal == same, path.name


@pytest.mark.parametrize("given", [dict(), dict(lr=5e-4), dict(threshold_lr=2e-2), dict(lr=5e-4, threshold_lr=2e-2)],
                         ids=["auto", "lr", "threshold_lr", "both"])
def test_default_learning_rate_follows_the_start_agreement(given, monkeypatch):
    """lr None: default_lr of the share a of the first batch on which the SNN (at the T trained at) agrees with
    the ANN's top-1, 5e-3 (1 - a) within [1e-4, 1e-3]; a given rate is kept and nothing is measured;
    threshold_lr None follows lr; the optimiser runs with the rates the report names."""
    from convert.finetune import LR_MAX, LR_MIN, TimeAveraged, default_lr
    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups: made.append(adamw(groups)) or made[-1])
    x, y = _data(16)
    chosen = set()
    # the last: measured at the T trained at, on every batch of an epoch shorter than AGREEMENT_IMAGES
    for convert_t, train_t, batch in ((1, 1, 16), (64, 64, 16), (64, 1, 4)):
        snn = _snn(T=convert_t)
        with torch.no_grad():  # the first batches are all 16 images (in some order: agreement does not care)
            snn_top1 = TimeAveraged(snn.net, train_t)(x).argmax(-1)
            with analog_mode(snn.net, exact=True):
                agreement = float((snn_top1 == snn.net(x).argmax(-1)).float().mean())
        finetune(snn, (x, y), epochs=1, batch_size=batch, timesteps=train_t, warmup=0.0, progress=False, **given)
        auto = default_lr(agreement)
        lr, threshold_lr = given.get("lr", auto), given.get("threshold_lr", given.get("lr", auto))
        report = snn.finetune_report
        assert report["options"]["lr"] == lr and report["options"]["threshold_lr"] == threshold_lr
        assert [g["base_lr"] for g in made[-1].param_groups] == [lr, threshold_lr]
        assert report["start_agreement"] == (None if "lr" in given else pytest.approx(agreement))
        chosen.add(auto)
    assert chosen == {LR_MAX, LR_MIN}  # T=1 starts far from the ANN, T=64 at it


@pytest.mark.parametrize("n, batch, sizes", [(1000, 64, [64] * 4), (1000, 100, [100] * 3), (1000, 512, [512]),
                                             (100, 64, [64, 36]), (300, 200, [200, 100])])
def test_the_start_agreement_is_measured_on_the_first_whole_batches_holding_256_images(n, batch, sizes):
    from convert.finetune import AGREEMENT_IMAGES, _Batches, check_finetune_options, first_batches
    assert AGREEMENT_IMAGES == 256
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    got = first_batches((x, y), batch_size=batch, seed=3)
    assert [len(b) for b in got] == sizes
    trained = _Batches((x, y), check_finetune_options(1, dict(batch_size=batch, seed=3)), True).epoch(0, 0)
    assert all(torch.equal(b, t[0]) for b, t in zip(got, trained))  # the batches training starts with


@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.79, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0])
def test_default_lr_falls_with_the_agreement_within_its_bounds(agreement):
    from convert.finetune import default_lr
    lr = default_lr(agreement)
    assert 1e-4 <= lr <= 1e-3 and lr == pytest.approx(min(1e-3, max(1e-4, 5e-3 * (1 - agreement))))
    assert default_lr(min(1.0, agreement + 0.01)) <= lr
