"""``finetune``: train the converted network over T timesteps (backpropagation through time).

The loss is taken on the mean output over T steps, run in multi-step mode:

    logits = (1/T) sum_t net(x)(t)
    loss = (1 - distill) CE(logits, y) + distill tau^2 KL(softmax(ann / tau) || softmax(logits / tau))
           + feature_distill * mean over blocks b of |mean_t h_b(t) - h_b^ann|^2 / |h_b^ann|^2
           + event_penalty * (events sent per neuron per step, over every neuron and step)

``blend`` fades the SNN in from the ANN over the first share ``blend`` of the steps: at step s,
lambda = min(1, s / (blend S)) and every neuron outputs lambda SN(x) + (1 - lambda) x, every
softmax-free attention core lambda variant + (1 - lambda) softmax attention (models.attention), every
``ConstantNorm`` lambda (gain x + shift) + (1 - lambda) norm(x) (models.normalization); the
network is the ANN at lambda = 0 and the pure SNN from lambda = 1 on (and after fine-tuning).

The events term counts |k| (|k(t) - k(t-1)| under differential coding) with the spikes' surrogate gradients,
so the penalty trades accuracy against the firing rate explicitly.

Spike functions get surrogate gradients (models.neurons.Surrogate), thresholds and
(optionally) weights are trained with AdamW, learning rate lr * warm-up * cosine:

    f(s) = s / w for s < w,  else 0.5 (1 + cos(pi (s - w) / (S - w)))     (S steps, w warm-up steps)

The teacher ``ann`` is the network as converted, in analog mode with every neuron the identity: exactly
the ANN, also where a variant replaced its softmax attention or made every Linear input binary.
Data order is a permutation seeded by (seed, epoch), so a run resumed from a checkpoint
written at step s takes the same batches, learning rates and optimiser state as an
uninterrupted one and ends with the same weights. Under torchrun the objective is
wrapped in DistributedDataParallel and each rank takes every world-th image of each
batch; rank 0 writes the checkpoints.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointError, checkpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from calibration import analog_mode
from convert import schema
from convert.checkpoint import CALIBRATED, load_training_state, save
from convert.config import show_progress
from convert.network import SpikingModel, check_images, check_timesteps
from convert.resources import freed_memory_reused
from models.distributed import all_reduce, is_main, rank, world_size
from models.attention import SpikingSDPA
from models.neurons import BaseNeuron, Surrogate
from models.normalization import ConstantNorm
from models.state import reset_net, set_step_mode

# lr=None sets the weights' learning rate by how far the converted network starts from the ANN: with a the share
# of the first training images (whole batches holding AGREEMENT_IMAGES) on which the SNN's top-1 is the ANN's,
# lr = LR_PER_DISAGREEMENT * (1 - a) within [LR_MIN, LR_MAX] (LR_MAX below 80% agreement, LR_MIN from 98%): a
# larger rate repairs a poor start but undoes a close one (at T=8, 150 steps at 1e-3 lost 0.4-2.3 pt on three
# models). Measured with `python -m benchmarks.recipes --timesteps 1 2 4 8` on three models, and on ssa / a2os2a
# (BENCHMARKS.md)
LR_MIN, LR_MAX, LR_PER_DISAGREEMENT = 1e-4, 1e-3, 5e-3
# one batch of 64 measures a with a standard deviation of ~2.7 pt at a = 0.95 (+-1.4e-4 in lr); 256 images halve
# it for the cost of ~1.5 training steps
AGREEMENT_IMAGES = 256


def default_lr(agreement: float) -> float:
    """The rate lr=None takes from the start agreement a: 5e-3 (1 - a) within [1e-4, 1e-3]."""
    return min(LR_MAX, max(LR_MIN, LR_PER_DISAGREEMENT * (1.0 - agreement)))


FINETUNE_DEFAULTS: Dict[str, Any] = dict(
    lr=None, threshold_lr=None, weight_decay=0.01, warmup=0.05, batch_size=64, timesteps=None, images=None,
    surrogate="ste", alpha=4.0, thresholds=True, weights=True, distill=0.0, temperature=1.0, event_penalty=0.0,
    blend=0.0, feature_distill=0.0, grad_checkpoint=False, checkpoint_every=0, checkpoint_path=None, resume=None, max_steps=None, seed=0,
    progress=True)
# options that change the trained result: a resumed run must use the same ones
RESULT_OPTIONS = ("lr", "threshold_lr", "weight_decay", "warmup", "batch_size", "timesteps", "images", "surrogate",
                  "alpha", "thresholds", "weights", "distill", "temperature", "event_penalty", "blend", "feature_distill", "seed")


def check_finetune_options(epochs: Any, options: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults and check every option with the schema's rules (convert.schema), then the rules across them."""
    unknown = sorted(set(options) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown finetune option(s) {', '.join(unknown)}: valid options are "
                         f"{', '.join(FINETUNE_DEFAULTS)}")
    o = {**FINETUNE_DEFAULTS, **options}
    schema.keys_by_path()["finetune.epochs"].check(epochs)
    schema.validate_options(o, "finetune")
    if not (o["thresholds"] or o["weights"]):
        raise ValueError("finetune has nothing to train: set finetune.thresholds=true and/or finetune.weights=true")
    if o["checkpoint_every"] and not o["checkpoint_path"]:
        raise ValueError("finetune.checkpoint_every needs checkpoint_path (where to write the checkpoints)")
    return o


def start_agreement(snn: SpikingModel, batches: Iterable[torch.Tensor], timesteps: int, seed: int) -> float:
    """The share of the images in ``batches`` (summed over ranks) on which the SNN's top-1 (mean output over
    ``timesteps``) is the ANN's, with random masks drawn from ``seed`` apart from the training's random stream."""
    device = next(snn.net.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for images in batches:
            images = images.to(device)
            snn_top1 = TimeAveraged(snn.net, timesteps)(images).argmax(-1)
            with analog_mode(snn.net, exact=True):
                ann_top1 = snn.net(images).argmax(-1)
            counts += torch.tensor([float((snn_top1 == ann_top1).sum()), float(len(images))], dtype=torch.float64)
    counts = all_reduce(counts)
    return float(counts[0] / counts[1].clamp(min=1))


def first_batches(train_data, **options) -> List[torch.Tensor]:
    """The images (this rank's share) of the first batches ``finetune(snn, train_data, **options)`` trains on
    that hold AGREEMENT_IMAGES images, or of its whole first epoch if that is shorter: what lr=None measures."""
    o = check_finetune_options(1, options)
    return _first_batches(_Batches(train_data, o, need_labels=False))


def _first_batches(batches: "_Batches") -> List[torch.Tensor]:
    return [b[0] for b in itertools.islice(batches.epoch(0, 0), -(-AGREEMENT_IMAGES // batches.batch_size))]


class TimeAveraged(nn.Module):
    """The training objective's forward: the mean output of ``net`` over T steps in multi-step mode.

    A plain module, so it can be wrapped in DistributedDataParallel."""

    def __init__(self, net: nn.Module, timesteps: int, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.net, self.timesteps, self.grad_checkpoint = net, timesteps, grad_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.timesteps
        set_step_mode(self.net, "m", T)
        folded = x.repeat(T, *([1] * (x.dim() - 1)))
        try:
            with _checkpointed_blocks(self.net, self.grad_checkpoint):
                out = self.net(folded)
        finally:
            reset_net(self.net)
        return out.reshape(T, x.shape[0], *out.shape[1:]).mean(0)


class EventMeter:
    """Forward hooks on every neuron that add up the events sent (|k|, or |k(t) - k(t-1)|), differentiably."""

    def __init__(self, neurons) -> None:
        self.clear()
        self.handles = [n.register_forward_hook(self._hook) for n in neurons]

    def clear(self) -> None:
        """Forget what was counted (blocks recomputed in a backward pass count again)."""
        self.total: Optional[torch.Tensor] = None
        self.elements = 0

    def _hook(self, module, inputs, output):
        if module.analog:
            return
        k = output / module.theta(output)  # k with the surrogate's gradient
        if module.coding == "differential":
            k = k - module._prior / module.theta(output).detach()
        events = k.abs().sum()
        self.total = events if self.total is None else self.total + events
        self.elements += output.numel()

    def rate(self) -> torch.Tensor:
        """Events per neuron per step since ``clear``."""
        return self.total / max(1, self.elements)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Blend:
    """The ANN-to-SNN fade-in: neurons output lambda SN(x) + (1 - lambda) x (forward hooks), softmax-free
    attention cores mix in the softmax attention and constant norms the norm they replace, with weight
    1 - lambda (their ``blend``)."""

    def __init__(self, net: nn.Module, neurons) -> None:
        self.value = 1.0
        self.cores = [m for m in net.modules() if isinstance(m, (SpikingSDPA, ConstantNorm)) and hasattr(m, "blend")]
        self.handles = [n.register_forward_hook(self._hook) for n in neurons]

    def set(self, value: float) -> None:
        self.value = value
        for core in self.cores:
            core.blend = value

    def _hook(self, module, inputs, output):
        if module.analog or self.value >= 1:
            return None
        return self.value * output + (1 - self.value) * inputs[0]

    def remove(self) -> None:
        self.set(1.0)
        for h in self.handles:
            h.remove()


class BlockOutputs:
    """Forward hooks that keep the output of every transformer block (``_blocks``) of the last call."""

    def __init__(self, net: nn.Module) -> None:
        self.outputs: List[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in _blocks(net)]

    def _hook(self, module, inputs, output):
        if isinstance(output, torch.Tensor):
            self.outputs.append(output)

    def take(self) -> List[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_loss(student: List[torch.Tensor], teacher: List[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of |mean_t h(t) - h_ann|^2 / |h_ann|^2; student outputs are folded [T * batch, ...]."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"finetune.feature_distill: the SNN's blocks gave {len(student)} outputs and the ANN's "
                         f"{len(teacher)}; this model has no transformer blocks to match, set feature_distill=0")
    terms = [((s.reshape(-1, *t.shape).mean(0) - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def _blocks(net: nn.Module):
    """The transformer blocks of any family: the members of every ``blocks`` sequence in the module tree."""
    return [block for name, seq in net.named_modules() if name.rpartition(".")[2] == "blocks"
            and isinstance(seq, (nn.Sequential, nn.ModuleList)) for block in seq]


@contextmanager
def _checkpointed_blocks(net: nn.Module, enabled: bool):
    """Recompute each transformer block in the backward pass instead of storing its T x batch activations.

    Valid in multi-step mode only, where a call covers all steps from a reset state (no carried state)."""
    blocks = _blocks(net) if enabled else []
    for block in blocks:
        block.forward = (lambda fwd: lambda *a, **k: checkpoint(fwd, *a, use_reentrant=False, **k))(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def finetune(snn: SpikingModel, train_data, epochs: int = 1, **options) -> SpikingModel:
    """Fine-tune ``snn`` in place over T steps (``timesteps`` option, default ``snn.timesteps``) and return it.

    ``train_data``: a Dataset of (image, label), a pair of tensors (images, labels), or a sized iterable
    of (images, labels) batches (used in its own order; resume then skips batches). Options: see
    FINETUNE_DEFAULTS and conf/finetune/. ``snn.finetune_report`` records losses, accuracy and time."""
    if not isinstance(snn, SpikingModel):
        raise ValueError(f"finetune expects a SpikingModel from convert(), got {type(snn).__name__}")
    o = check_finetune_options(epochs, options)
    if epochs == 0:
        return snn
    T = check_timesteps(o["timesteps"] or snn.timesteps)
    device = next(snn.net.parameters()).device
    batches = _Batches(train_data, o, need_labels=o["distill"] < 1)
    total = epochs * len(batches)
    teacher = _teacher(snn) if o["distill"] > 0 or o["feature_distill"] > 0 else None

    origin = _origin(snn.net) if teacher is not None else None  # the teacher is made from the network passed in
    resume_meta, resume_tensors = {"epoch": 0, "batch": 0, "step": 0, "history": []}, {}
    agreement, lr = None, o["lr"]
    if o["resume"]:
        resume_tensors, resume_meta = load_training_state(o["resume"], snn, origin)
        if lr is None:  # the rate the run started with
            lr = resume_meta["options"].get("lr", LR_MAX)
    elif lr is None:
        first = _first_batches(batches)
        check_images(snn.inputs, first[0])
        agreement = start_agreement(snn, first, T, o["seed"])
        lr = default_lr(agreement)
    o = {**o, "lr": lr, "threshold_lr": lr if o["threshold_lr"] is None else o["threshold_lr"]}
    if o["resume"]:
        written = {k: resume_meta["options"].get(k, FINETUNE_DEFAULTS[k]) for k in RESULT_OPTIONS}  # older: defaults
        if written != {k: o[k] for k in RESULT_OPTIONS} \
                or resume_meta["epochs"] != epochs:
            raise ValueError(f"cannot resume from {o['resume']}: it was written with other fine-tuning options "
                             f"(epochs {resume_meta['epochs']}, {_result_options(resume_meta['options'])}); "
                             f"use the same ones to continue it")
    neurons = [m for m in snn.net.modules() if isinstance(m, BaseNeuron)]
    flags = {p: p.requires_grad for p in snn.net.parameters()}
    thresholds = [n.threshold for n in neurons]
    threshold_ids = {id(p) for p in thresholds}
    weights = [p for p in snn.net.parameters() if id(p) not in threshold_ids]
    for p in thresholds:
        p.requires_grad_(o["thresholds"])
    for p in weights:
        p.requires_grad_(o["weights"])
    groups = ([{"params": weights, "lr": o["lr"], "weight_decay": o["weight_decay"]}] if o["weights"] else []) + \
             ([{"params": thresholds, "lr": o["threshold_lr"], "weight_decay": 0.0}] if o["thresholds"] else [])
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups)
    if resume_tensors:
        _load_optimizer(optimizer, resume_tensors)
        torch.set_rng_state(resume_tensors["rng"])
        if "cuda_rng" in resume_tensors and device.type == "cuda":
            torch.cuda.set_rng_state(resume_tensors["cuda_rng"], device)
    else:
        torch.manual_seed(o["seed"])
    objective = TimeAveraged(snn.net, T, o["grad_checkpoint"])
    if world_size() > 1:  # torchrun: each rank trains on its share of every batch, gradients averaged
        from torch.nn.parallel import DistributedDataParallel
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=True)
    surrogate = Surrogate(o["surrogate"], o["alpha"])
    meter = EventMeter(neurons) if o["event_penalty"] > 0 else None
    blend = Blend(snn.net, neurons) if o["blend"] > 0 else None
    taps = (BlockOutputs(snn.net), BlockOutputs(teacher)) if o["feature_distill"] > 0 else None
    step, history = resume_meta["step"], list(resume_meta["history"])
    elapsed = resume_meta.get("seconds", 0.0)
    start = time.time()
    snn.net.train()
    for n in neurons:
        n.surrogate = surrogate
    with freed_memory_reused(device):  # the CPU's freed memory kept from step to step, given back at the end
        try:
            for epoch in range(resume_meta["epoch"], epochs):
                skip = resume_meta["batch"] if epoch == resume_meta["epoch"] else 0
                stats = history[epoch] if skip and epoch < len(history) else {"loss": 0.0, "correct": 0, "images": 0}
                history = history[:epoch] + [stats]
                bar = tqdm(batches.epoch(epoch, skip), total=len(batches), initial=skip,
                           disable=not show_progress(o["progress"]),
                           desc=f"fine-tuning T={T} epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
                for b, (images, labels) in enumerate(bar, start=skip):
                    if blend is not None:
                        blend.set(min(1.0, step / (o["blend"] * total)))
                    loss, correct = _train_step(snn, objective, optimizer, thresholds, teacher, images, labels, device,
                                                o, _schedule(step, total, o["warmup"]), meter, taps)
                    step += 1
                    stats["loss"] += loss * len(images)
                    stats["images"] += len(images)
                    stats["correct"] += correct
                    bar.set_postfix(loss=f"{stats['loss'] / stats['images']:.4f}",
                                    acc=f"{100 * stats['correct'] / stats['images']:.1f}%")
                    position = (epoch, b + 1) if b + 1 < len(batches) else (epoch + 1, 0)
                    due = step in (total, o["max_steps"]) or \
                        (o["checkpoint_every"] and step % o["checkpoint_every"] == 0)
                    if o["checkpoint_path"] and is_main() and due:
                        report = _report(o, epochs, step, total, history, T, elapsed + time.time() - start)
                        _write_checkpoint(snn, optimizer, o, epochs, step, position, history, report, origin)
                    if step == o["max_steps"]:
                        break
                if step == o["max_steps"]:
                    break
        finally:
            for hooks in (meter, blend) + (taps or ()):
                if hooks is not None:
                    hooks.remove()
            for n in neurons:
                n.surrogate = None
            for p, flag in flags.items():
                p.requires_grad_(flag)
            snn.net.eval()
            reset_net(snn.net)
            set_step_mode(snn.net, snn.step_mode)
    snn.finetune_report = {**_report(o, epochs, step, total, history, T, elapsed + time.time() - start),
                           "start_agreement": agreement}
    return snn


def _train_step(snn, objective, optimizer, thresholds, teacher, images, labels, device, o,
                factor: float, meter: Optional[EventMeter] = None, taps=None) -> Tuple[float, int]:
    """One optimiser step; returns the batch loss and the number of correct predictions."""
    check_images(snn.inputs, images)
    images = images.to(device, non_blocking=True)
    if labels is not None:
        labels = _checked_labels(labels, images, snn).to(device, non_blocking=True)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    if meter is not None:
        meter.clear()
    logits = objective(images)
    loss = _loss(logits, labels, teacher, images, o, taps)
    if meter is not None:
        loss = loss + o["event_penalty"] * meter.rate()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the fine-tuning loss became {float(loss.detach())}: lower finetune lr (now {o['lr']})")
    optimizer.zero_grad(set_to_none=True)
    try:
        loss.backward()
    except CheckpointError:
        raise ValueError("finetune.grad_checkpoint=true does not work for this model: recomputing one of its blocks "
                         "in the backward pass gives other operations than its forward pass; set "
                         "finetune.grad_checkpoint=false") from None
    optimizer.step()
    with torch.no_grad():
        for p in thresholds:
            p.clamp_(min=1e-6)
    correct = 0 if labels is None else int((logits.argmax(-1) == labels).sum())
    return float(loss.detach()), correct


def _schedule(step: int, total: int, warmup: float) -> float:
    w = int(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _loss(logits, labels, teacher, images, o, taps=None) -> torch.Tensor:
    loss = logits.new_zeros(())
    if o["distill"] < 1:
        loss = loss + (1 - o["distill"]) * F.cross_entropy(logits, labels)
    if teacher is None:
        return loss
    student_features = taps[0].take() if taps else None
    with torch.no_grad(), analog_mode(teacher, exact=True):
        ann = teacher(images)
    if o["distill"] > 0:
        tau = o["temperature"]
        loss = loss + o["distill"] * tau * tau * F.kl_div(F.log_softmax(logits / tau, -1), F.softmax(ann / tau, -1),
                                                          reduction="batchmean")
    if taps:
        loss = loss + o["feature_distill"] * feature_loss(student_features, taps[1].take())
    return loss


def _origin(net: nn.Module) -> str:
    """SHA-256 of the weights that are not calibrated (those the ANN teacher is made of), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        if name.rpartition(".")[2] not in CALIBRATED:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _teacher(snn: SpikingModel) -> nn.Module:
    """A frozen copy of the network; it computes the ANN in ``analog_mode(teacher, exact=True)``."""
    teacher = copy.deepcopy(snn.net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _checked_labels(labels, images: torch.Tensor, snn: SpikingModel) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0] \
            or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor [batch] matching {images.shape[0]} images, got {shape}")
    classes = snn.net.num_classes
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be class indices in 0..{classes - 1}, got values {int(labels.min())}.."
                         f"{int(labels.max())}")
    return labels


class _Batches:
    """The training data as (images, labels) batches per epoch, in a seeded order that resume can skip into."""

    def __init__(self, data, o: Dict[str, Any], need_labels: bool) -> None:
        self.batch_size, self.seed, self.images = o["batch_size"], o["seed"], o["images"]
        if isinstance(data, torch.Tensor):
            if need_labels:
                raise ValueError("the training data holds images but no labels: give (images, labels), a labelled "
                                 "dataset, or set finetune distill=1 to learn from the ANN's outputs alone")
            data = TensorDataset(data)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            if len(data[0]) != len(data[1]):
                raise ValueError(f"{len(data[0])} images but {len(data[1])} labels in the training data")
            data = TensorDataset(*data)
        self.dataset = data if isinstance(data, Dataset) and hasattr(data, "__len__") \
            and not isinstance(data, torch.utils.data.IterableDataset) else None
        self.loader = None if self.dataset is not None else data
        if self.loader is not None and not hasattr(self.loader, "__len__"):
            raise ValueError("the training data must be a Dataset or a sized iterable of (images, labels) batches "
                             "(the cosine schedule needs the number of batches)")
        self.need_labels = need_labels
        if len(self) == 0:
            raise ValueError("the training data holds no images")

    def _size(self) -> int:
        n = len(self.dataset)
        return n if self.images is None else min(n, self.images)

    def __len__(self) -> int:
        if self.dataset is None:
            return len(self.loader)
        n = self._size()  # a last batch too small to give every rank an image is left out
        return n // self.batch_size + (n % self.batch_size >= world_size())

    def epoch(self, epoch: int, skip: int) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        world, me = world_size(), rank()
        if self.dataset is None:
            batches = iter(self.loader)
            for _ in range(skip):
                next(batches)
            for batch in batches:
                images, labels = self._split(batch)
                if len(images) < world:
                    raise ValueError(f"a training batch of {len(images)} images cannot be shared by {world} "
                                     f"processes: use larger batches or fewer processes")
                yield images[me::world], (None if labels is None else labels[me::world])
            return
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.dataset), generator=gen)[:self._size()].tolist()
        starts = range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size)
        # under torchrun each rank loads only its share of every global batch
        plan = [order[i:i + self.batch_size][me::world] for i in starts]
        loader = DataLoader(self.dataset, batch_sampler=plan, pin_memory=torch.cuda.is_available() and self._on_cpu())
        for batch in loader:
            yield self._split(batch)

    def _on_cpu(self) -> bool:
        """Whether the dataset's images are CPU tensors (only those can be pinned; a GPU's are already there)."""
        first = self.dataset[0]
        image = first[0] if isinstance(first, (tuple, list)) else first
        return not isinstance(image, torch.Tensor) or image.device.type == "cpu"

    def _split(self, batch):
        if isinstance(batch, torch.Tensor):
            images, labels = batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
            images, labels = batch[0], (batch[1] if len(batch) == 2 else None)
        else:
            raise ValueError(f"a training batch must be (images, labels), got {type(batch).__name__}"
                             f"{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}")
        if labels is None and self.need_labels:
            raise ValueError("the training data holds images but no labels: give (images, labels) batches, or set "
                             "finetune distill=1 to learn from the ANN's outputs alone")
        return images, labels


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> None:
    state = optimizer.state_dict()
    per_param: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/")
            per_param.setdefault(int(index), {})[name] = value
    state["state"] = per_param
    optimizer.load_state_dict(state)


def _write_checkpoint(snn, optimizer, o, epochs, step, position, history, report, origin: Optional[str]) -> None:
    """The SNN (loadable with ``load``) plus what resuming needs: optimiser state, RNG state, position, and, for
    a run with a teacher, the fingerprint of the network it started from (``_origin``)."""
    tensors = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and next(snn.net.parameters()).is_cuda:
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            tensors[f"optim/{index}/{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    meta = {"epoch": position[0], "batch": position[1], "step": step, "epochs": epochs,
            "history": history, "seconds": report["seconds"], "options": {k: o[k] for k in RESULT_OPTIONS},
            "origin": origin}
    snn.finetune_report = report
    was_training = snn.net.training
    save(snn, Path(o["checkpoint_path"]), training_state=(tensors, meta))
    snn.net.train(was_training)


def _result_options(options: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={options.get(k)}" for k in RESULT_OPTIONS)


def _report(o, epochs, step, total, history, T, seconds) -> Dict[str, Any]:
    return {"epochs": epochs, "steps": step, "complete": step == total, "timesteps": T, "seconds": seconds,
            "loss": [h["loss"] / max(1, h["images"]) for h in history],
            "train_top1": [100.0 * h["correct"] / max(1, h["images"]) for h in history],
            "options": {k: o[k] for k in RESULT_OPTIONS}}
