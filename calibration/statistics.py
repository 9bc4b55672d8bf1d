"""Streaming statistics of every neuron's input, with memory bounded independently of the data.

Each neuron gets a ``RunningHistogram``: counts of positive and of negative
magnitudes in ``bins`` equal bins over [0, R], where R is a power of two that
doubles (merging neighbouring bins) whenever a larger value arrives, plus exact
maxima. Per-channel histograms keep one row per channel of the last axis.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set

import torch
from torch import nn
from tqdm.auto import tqdm

from models.attention import SpikeMask
from models.distributed import all_reduce, world_size
from models.neurons import BaseNeuron
from models.normalization import ConstantNorm
from models.state import reset_net, set_step_mode


class RunningHistogram:
    """Histogram of x > 0 and of -x for x < 0 (zeros counted apart), over a range that grows by doubling."""

    def __init__(self, bins: int = 2048, channels: Optional[int] = None) -> None:
        self.bins = bins
        self.channels = channels
        rows = channels or 1
        self.pos = torch.zeros(rows, bins, dtype=torch.float64)
        self.neg = torch.zeros(rows, bins, dtype=torch.float64)
        self.zeros = torch.zeros(rows, dtype=torch.float64)
        self.max_pos = torch.zeros(rows, dtype=torch.float64)
        self.max_neg = torch.zeros(rows, dtype=torch.float64)
        self.range = 0.0

    @property
    def count(self) -> torch.Tensor:
        return self.pos.sum(-1) + self.neg.sum(-1) + self.zeros

    def _grow(self, needed: float) -> None:
        """Range: the smallest power of two strictly above ``needed`` (so no value falls on the top edge and
        binning does not depend on when the range grew)."""
        self._resize(2.0 ** (math.floor(math.log2(needed)) + 1) if needed > 0 else 1.0)

    def _resize(self, new: float) -> None:
        """Grow the range to ``new`` (a power of two) by merging pairs of bins."""
        if self.range == 0.0:
            self.range = new
            return
        while self.range < new:
            self.pos = self.pos.view(-1, self.bins // 2, 2).sum(-1)
            self.pos = torch.cat([self.pos, torch.zeros_like(self.pos)], dim=-1)
            self.neg = self.neg.view(-1, self.bins // 2, 2).sum(-1)
            self.neg = torch.cat([self.neg, torch.zeros_like(self.neg)], dim=-1)
            self.range *= 2.0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of activations; they are binned on their own device and the counts kept on the CPU
        (where ``merge_ranks`` sums them), so a GPU's activations never travel whole."""
        x = x.detach().to(torch.float64)
        rows = x.reshape(-1, self.channels).t() if self.channels else x.reshape(1, -1)
        peak = float(rows.abs().max()) if rows.numel() else 0.0
        if peak >= self.range or self.range == 0.0:
            self._grow(peak)
        self.max_pos = torch.maximum(self.max_pos, rows.clamp(min=0).amax(-1).cpu())
        self.max_neg = torch.maximum(self.max_neg, (-rows).clamp(min=0).amax(-1).cpu())
        self.zeros += (rows == 0).sum(-1).cpu()
        scale = self.bins / self.range
        for sign, hist in ((1.0, self.pos), (-1.0, self.neg)):
            mag = rows * sign
            idx = torch.clamp((mag * scale).long(), max=self.bins - 1)
            local = hist if hist.device == rows.device else torch.zeros_like(hist, device=rows.device)
            local.scatter_add_(1, torch.where(mag > 0, idx, 0), (mag > 0).to(torch.float64))
            if local is not hist:
                hist += local.cpu()

    def merge_ranks(self) -> None:
        """Sum the histograms of every rank (torchrun): grow to the largest range, then add counts.

        Bins at range 2R are exact unions of bins at range R, so the merged histogram equals the
        one a single process would build from all the images."""
        if world_size() <= 1:
            return
        self._resize(float(all_reduce(torch.tensor([self.range], dtype=torch.float64), "max")))
        for name in ("pos", "neg", "zeros"):
            all_reduce(getattr(self, name))
        for name in ("max_pos", "max_neg"):
            all_reduce(getattr(self, name), "max")

    def magnitudes(self, signed: bool) -> torch.Tensor:
        """Counts per bin of the values a neuron must represent: |x| if signed, else max(x, 0)."""
        return self.pos + self.neg if signed else self.pos

    def bin_edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self.range, self.bins + 1, dtype=torch.float64)

    def maximum(self, signed: bool) -> torch.Tensor:
        return torch.maximum(self.max_pos, self.max_neg) if signed else self.max_pos

    def fraction_above(self, r: torch.Tensor, signed: bool) -> torch.Tensor:
        """Share of values whose magnitude exceeds ``r`` (per row; to one bin's resolution)."""
        edges = self.bin_edges()[1:]
        counts = self.magnitudes(signed)
        above = (counts * (edges[None, :] > r.reshape(-1, 1).to(torch.float64))).sum(-1)
        return above / self.count.clamp(min=1)

    def quantile(self, q: float, signed: bool) -> torch.Tensor:
        """The q-quantile (0 < q <= 1) of |x| (signed) or max(x, 0), per row, interpolated within a bin.

        All values (zeros and, when unsigned, negatives as 0) count toward the total."""
        counts = self.magnitudes(signed)
        total = self.count
        below = total - counts.sum(-1)  # values at 0
        cum = below[:, None] + torch.cumsum(counts, -1)
        target = q * total
        idx = torch.searchsorted(cum, target[:, None]).squeeze(-1).clamp(max=self.bins - 1)
        prev = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)[:, None]).squeeze(-1), below)
        in_bin = counts.gather(1, idx[:, None]).squeeze(-1)
        frac = torch.where(in_bin > 0, (target - prev) / in_bin.clamp(min=1e-12), torch.zeros_like(prev)).clamp(0, 1)
        width = self.range / self.bins
        value = (idx.to(torch.float64) + frac) * width
        value = torch.where(target <= below, torch.zeros_like(value), value)
        return torch.minimum(value, self.maximum(signed))


def iter_images(data, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Image batches from a tensor [N, C, H, W] or an iterable of tensors / (images, labels) pairs."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"image tensor must be [N, C, H, W], got shape {tuple(data.shape)}")
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    for batch in data:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(batch, dict):
            images = batch.get("image", batch.get("images"))
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"a batch must be a tensor or an (images, labels) pair, got {type(batch).__name__}")
        yield images


@contextmanager
def analog_mode(net: nn.Module, exact: bool = False, only: Optional[Sequence[BaseNeuron]] = None):
    """Neurons (and random attention masks) become the identity and every module runs one step per call:
    ``net`` computes the ANN (ssa and a2os2a compute the softmax attention they replace). An unsigned
    neuron passes only x >= 0 (what it can send: the calibration's view) unless ``exact``, which makes
    every neuron the identity and every ``ConstantNorm`` the norm it replaced: exactly the ANN (the reference
    accuracy, the distillation teacher). ``only``: these neurons alone (the rest of the network, random masks
    and constant norms included, stays as it is)."""
    if only is None:
        neurons = [m for m in net.modules() if isinstance(m, BaseNeuron)]
        switched = neurons + [m for m in net.modules() if isinstance(m, SpikeMask)]
        norms = [m for m in net.modules() if isinstance(m, ConstantNorm)]
    else:
        neurons, norms = list(only), []
        switched = neurons
    signs = [n.signed for n in neurons]
    reset_net(net)
    set_step_mode(net, "s")
    for n in switched:
        n.analog = True
    if exact:
        for n in neurons:
            n.signed = True
        for n in norms:
            n.exact = True
    try:
        yield neurons
    finally:
        for n in switched:
            n.analog = False
        for n, signed in zip(neurons, signs):
            n.signed = signed
        for n in norms:
            n.exact = False
        reset_net(net)


def token_groups(x: torch.Tensor, prefix_tokens: int, tokens: Optional[int]) -> List[torch.Tensor]:
    """A neuron's input split by token: the prefix tokens (class, register, distillation) one by one, then the
    rest, where the input has the model's token axis (second to last, of length ``tokens``); else [x]."""
    if not prefix_tokens or tokens is None or x.dim() < 3 or x.shape[-2] != tokens:
        return [x]
    return [x[..., i, :] for i in range(prefix_tokens)] + [x[..., prefix_tokens:, :]]


def collect_statistics(net: nn.Module, batches: Iterable[torch.Tensor], bins: int = 2048, per_channel: bool = False,
                       progress: bool = True, prefix_tokens: int = 0,
                       tokens: Optional[int] = None,
                       only: Optional[Set[BaseNeuron]] = None) -> Dict[str, List[RunningHistogram]]:
    """Run ``net`` in analog mode over image batches; histograms of the input of each neuron (or of the
    neurons in ``only``): one, or (with ``prefix_tokens`` P > 0, for inputs along the model's ``tokens`` axis)
    one per prefix token and one for the other tokens."""
    names = {m: name for name, m in net.named_modules() if isinstance(m, BaseNeuron) and (only is None or m in only)}
    hists: Dict[str, List[RunningHistogram]] = {}

    def hook(module, inputs):
        x = inputs[0]
        name = names[module]
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite activations (NaN or inf) at the input of {name}: "
                             f"check the model weights and the input images")
        channels_last = module.channel_axis == -1
        if per_channel and module.channelwise and not channels_last:
            x = x.movedim(module.channel_axis, -1)  # the histogram's rows are channels of the last axis
        groups = token_groups(x, prefix_tokens if channels_last else 0, tokens)
        if name not in hists:
            channels = x.shape[-1] if per_channel and module.channelwise else None
            hists[name] = [RunningHistogram(bins, channels) for _ in groups]
        if len(groups) != len(hists[name]):
            raise ValueError(f"the input of {name} changed shape during calibration ({tuple(x.shape)}): calibrate "
                             f"on images of one size")
        for hist, part in zip(hists[name], groups):
            hist.update(part)

    seen = 0
    with analog_mode(net), torch.no_grad():
        handles = [m.register_forward_pre_hook(hook) for m in names]
        try:
            for images in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, leave=False):
                reset_net(net)
                net(images)
                seen += len(images)
        finally:
            for h in handles:
                h.remove()
    if seen == 0:
        raise ValueError("calibration data is empty: pass at least one image")
    for name in sorted(hists):
        for hist in hists[name]:
            hist.merge_ranks()
    return hists
