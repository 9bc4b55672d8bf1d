"""Operation counts, firing rates and the energy estimate of a converted network (DESIGN section 6).

Per image, summed over T steps:
- synapse (Linear / Conv fed by a neuron): SOPs = events x fan-out (fan-out = the
  layer's dense MACs / input elements: out_features for a Linear), an event being one
  unit of |k| (one per spike for the multi-threshold neuron). Under differential coding
  the neuron sends k(t) - k(t-1) and the events are those of the change (the layer keeps
  W k(t-1) theta and accumulates the change's weights).
- ``strict``: an element sent with |value| > 1 (in units of theta: a multi-level count or a
  graded 2^j) is a multiplication: it costs fan-out MACs instead of its |k| x fan-out SOPs,
  so graded codes cannot hide their cost; values of +-1 stay accumulations.
- a layer fed analog values (the first layer, fed the image): dense MACs every step;
  under differential coding only at steps whose input changed (the image arrives once).
- expectation-compensated non-linearities (LayerNorm, GELU, softmax, ...) and the calibrated
  per-channel scale of ssa / a2os2a outputs: one MAC per element per step (a lower bound; they
  stay analog). A ``ConstantNorm`` (norm=constant) costs nothing: its per-channel map folds into the
  threshold and bias current of the neuron that reads it (models.normalization).
- spike products (Q K^T, A V, SwiGLU gates) in expectation: the spike-driven increments
  a(t) S_B(t-1) + S_A(t-1) b(t) + a(t) b(t) are accumulations, events_a x columns(B) +
  events_b x rows(A) SOPs, with the events of the levels a(t), b(t) whatever the coding
  (the increments need the current levels); the rescaling of the previous product (one
  per output element per step) stays analog. psa counts the events left after its masks.
- value centring (models.attention.ValueCentring): the attention map's row sums and the keys' mean
  value are additions, one SOP per non-zero element; their outer product is dense MACs.
- the row_max map's normalisation (models.attention.RowNormalisation): its row sums are additions, one SOP
  per non-zero element of the map; the division (P V) / (P 1) is a compensated non-linearity (above).
- step-by-step products (ssa, a2os2a): each event of a spike operand adds one row/column
  of the other, events_a x columns(B) (or events_b x rows(A), whichever operand is spikes
  and sparser); two real operands are dense MACs.
Energy: 4.6 pJ per MAC, 0.9 pJ per SOP. The ANN's MACs are the dense counts of the
same modules for one forward pass (non-linearities at one MAC per element).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from calibration.statistics import analog_mode, iter_images
from convert.network import SpikingModel, check_images, check_timesteps
from models.attention import ChannelAffine, RowNormalisation, ValueCentring
from models.ecm import ExpectationCompensation, SpikeProduct
from models.neurons import BaseNeuron
from models.normalization import ConstantNorm
from models.state import run_steps
from models.synapse import SpikingSynapse, dense_macs

E_MAC_PJ = 4.6
E_SOP_PJ = 0.9
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def event_costs(k: torch.Tensor, events: torch.Tensor, fan_out: float) -> Tuple[float, float, float]:
    """(standard SOPs, strict SOPs, strict MACs) of integer values ``k`` sent as ``events`` per element (|k|
    for counts, one per non-zero graded spike), each reaching ``fan_out`` synapses: one SOP per event, and under
    the strict accounting one MAC per synapse for each |k| > 1 instead."""
    graded = k.abs() > 1
    return float(events.sum()) * fan_out, float(events[~graded].sum()) * fan_out, float(graded.sum()) * fan_out


def _costs(neuron: BaseNeuron, k: torch.Tensor, fan_out: float) -> Tuple[float, float, float]:
    """``event_costs`` of the integer values ``k`` a neuron sent, counted as its events."""
    return event_costs(k, neuron.count(k), fan_out)


def product_macs(op, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    """Dense MACs of a bilinear product: matmul, element-wise, or einsum (every index combination once)."""
    if op is torch.mul:
        return float(out.numel())
    equation = getattr(op, "args", None)
    if equation:
        sizes = {}
        lhs = equation[0].replace(" ", "").split("->")[0].split(",")
        for letters, tensor in zip(lhs, (a, b)):
            sizes.update(zip(letters, tensor.shape[-len(letters):]))
        total = 1.0
        for n in sizes.values():
            total *= n
        return total
    return float(out.numel() * a.shape[-1])


class _Counter:
    """Forward hooks that add up operations per module."""

    def __init__(self, net: nn.Module, steps_per_call: int = 1) -> None:
        self.analog = False
        self.ops: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.handles = []
        self.pending: Dict[int, Tuple[BaseNeuron, torch.Tensor]] = {}  # synapse -> (its neuron, its output) this call
        self.steps_per_call = steps_per_call  # T in multi-step mode
        self.differential = any(isinstance(m, BaseNeuron) and m.coding == "differential" for m in net.modules())
        self.last_input: Dict[str, Optional[torch.Tensor]] = {}  # analog layers' input at the previous step
        names = {m: n for n, m in net.named_modules()}
        in_synapse = {id(m.layer) for m in net.modules() if isinstance(m, SpikingSynapse)}
        for m in net.modules():
            if isinstance(m, SpikingSynapse):
                self._hook(m.neuron, self._synapse_events(id(m)))
                self._hook(m, self._synapse(names[m], m), with_kwargs=True)
            elif isinstance(m, LAYERS) and id(m) not in in_synapse:
                self._hook(m, self._analog_layer(names[m]))
            elif isinstance(m, (ExpectationCompensation, ChannelAffine, ConstantNorm)):
                self._hook(m, self._nonlinear(names[m], spiking_cost=not isinstance(m, ConstantNorm)))
            elif isinstance(m, ValueCentring):  # the map's row sums and the keys' mean value
                self._hook(m, self._additions(names[m], (0, 1)))
            elif isinstance(m, RowNormalisation):  # the map's row sums
                self._hook(m, self._additions(names[m], (1,)))
            if isinstance(m, BaseNeuron):
                self._hook(m, self._neuron(names[m], m))
            if hasattr(m, "products"):
                for product, neuron_a, neuron_b, transposed_b in m.products():
                    self._hook(product, self._product(names[product], neuron_a, neuron_b, transposed_b,
                                                      expectation=isinstance(product, SpikeProduct)))

    def _hook(self, module, fn, with_kwargs=False):
        self.handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def _synapse_events(self, key):
        def hook(module, inputs, output):
            if not self.analog:
                self.pending[key] = (module, output)
        return hook

    def new_sequence(self) -> None:
        self.last_input.clear()

    def _changed_steps(self, name: str, x: torch.Tensor) -> int:
        """Steps of this call whose input differs from the previous step's."""
        if self.steps_per_call == 1:
            last, self.last_input[name] = self.last_input.get(name), x
            return int(last is None or last.shape != x.shape or not torch.equal(last, x))
        xs = x.reshape(self.steps_per_call, -1)
        return 1 + int((xs[1:] != xs[:-1]).any(dim=1).sum())

    def _synapse(self, name, synapse):
        def hook(module, inputs, kwargs, output):
            x, args = inputs[0], inputs[1:]
            dense = dense_macs(synapse.layer_weight(args, kwargs), x, output)
            rec = self.ops[name]
            if self.analog:
                rec["ann_macs"] += dense
                return
            neuron, spikes = self.pending.pop(id(module))
            sops, strict_sops, strict_macs = _costs(neuron, neuron.sent(spikes), dense / max(1, x.numel()))
            rec["sops"] += sops
            rec["strict_sops"] += strict_sops
            rec["strict_macs"] += strict_macs
        return hook

    def _analog_layer(self, name):
        """A layer fed analog values (the first layer, fed the image): dense MACs every step."""
        def hook(module, inputs, output):
            dense = dense_macs(module.weight, inputs[0], output)
            rec = self.ops[name]
            if self.analog:
                rec["ann_macs"] += dense
                return
            if self.differential:
                dense *= self._changed_steps(name, inputs[0]) / self.steps_per_call
            rec["macs"] += dense
            rec["strict_macs"] += dense
        return hook

    def _nonlinear(self, name, spiking_cost=True):
        """One MAC per output element: the ANN's; the SNN's at every step unless ``spiking_cost`` is False."""
        def hook(module, inputs, output):
            n = float(sum(o.numel() for o in output) if isinstance(output, tuple) else output.numel())
            rec = self.ops[name]
            if self.analog:
                rec["ann_macs"] += n
            elif spiking_cost:
                rec["macs"] += n
                rec["strict_macs"] += n
        return hook

    def _additions(self, name, operands):
        """Sums over the inputs at ``operands`` (row sums, means): one addition per non-zero element, whatever
        its value."""
        def hook(module, inputs, output):
            if not self.analog:
                adds = float(sum(int(inputs[i].count_nonzero()) for i in operands))
                self.ops[name]["sops"] += adds
                self.ops[name]["strict_sops"] += adds
        return hook

    def _neuron(self, name, neuron):
        def hook(module, inputs, output):
            if not self.analog:
                rec = self.ops[name]
                rec["events"] += float(neuron.events(output).sum())
                rec["neuron_steps"] += float(output.numel())
        return hook

    def _product(self, name, neuron_a, neuron_b, transposed_b=False, expectation=True):
        """Expectation products (ecm, psa, generic): both operands' events; step products (ssa, a2os2a): the
        cheaper operand. Fan-out of an event = dense MACs / operand elements."""
        def hook(module, inputs, output):
            a, b = inputs[:2]  # MaskedSpikeProduct: the kept events, then the full streams
            rec = self.ops[name]
            dense = product_macs(module.op, a, b, output)
            if self.analog:
                rec["ann_macs"] += dense
                return
            terms = []  # (standard SOPs, strict SOPs, strict MACs) for each spike operand
            if neuron_a is not None:
                terms.append(_costs(neuron_a, neuron_a.integer_levels(a), dense / a.numel()))
            if neuron_b is not None:
                b = b.transpose(-2, -1) if transposed_b else b
                terms.append(_costs(neuron_b, neuron_b.integer_levels(b), dense / b.numel()))
            if not terms:
                rec["macs"] += dense
                rec["strict_macs"] += dense
                return
            if expectation:  # increments from both operands, plus the rescaling of the previous product
                costs = [sum(c) for c in zip(*terms)]
                rec["macs"] += float(output.numel())
                rec["strict_macs"] += float(output.numel())
            else:  # the sparser operand drives the accumulations
                costs = min(terms)
            rec["sops"] += costs[0]
            rec["strict_sops"] += costs[1]
            rec["strict_macs"] += costs[2]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def energy_report(snn: SpikingModel, images, timesteps: int = None, batch_size: int = 64) -> Dict:
    """Per-image MACs, SOPs and energy of the SNN over T steps beside the ANN's; firing rates per neuron layer."""
    T = snn.timesteps if timesteps is None else check_timesteps(timesteps)
    device = next(snn.net.parameters()).device
    counter = _Counter(snn.net, T if snn.step_mode == "m" else 1)
    n_images = 0
    try:
        for x in iter_images(images, batch_size):
            counter.new_sequence()
            check_images(snn.inputs, x)
            x = x.to(device, non_blocking=True)
            counter.analog = True
            with analog_mode(snn.net):
                snn.net(x)
            counter.analog = False
            run_steps(snn.net, x, T, snn.step_mode)
            n_images += len(x)
    finally:
        counter.remove()
    if n_images == 0:
        raise ValueError("energy_report needs at least one image")
    layers = {}
    for name, rec in counter.ops.items():
        layers[name] = {k: v / n_images for k, v in rec.items() if k not in ("events", "neuron_steps")}
        if rec.get("neuron_steps"):
            layers[name]["firing_rate"] = rec["events"] / rec["neuron_steps"]
    total = lambda key: sum(r.get(key, 0.0) for r in layers.values())  # noqa: E731
    snn_macs, snn_sops, ann_macs = total("macs"), total("sops"), total("ann_macs")
    strict_macs, strict_sops = total("strict_macs"), total("strict_sops")
    energy_snn = snn_macs * E_MAC_PJ + snn_sops * E_SOP_PJ
    analog = sorted(((n, r["macs"] * E_MAC_PJ / energy_snn) for n, r in layers.items() if r.get("macs")),
                    key=lambda kv: -kv[1]) if energy_snn else []
    return {
        "timesteps": T, "images": n_images,
        "ann_macs": ann_macs, "snn_macs": snn_macs, "snn_sops": snn_sops,
        "snn_strict_macs": strict_macs, "snn_strict_sops": strict_sops,
        "energy_ann_pj": ann_macs * E_MAC_PJ, "energy_snn_pj": energy_snn,
        "energy_snn_strict_pj": strict_macs * E_MAC_PJ + strict_sops * E_SOP_PJ,
        "analog_share": sum(s for _, s in analog),
        "firing_rates": {n: r["firing_rate"] for n, r in layers.items() if "firing_rate" in r},
        "analog_ops": [{"module": n, "energy_share": s} for n, s in analog],
        "layers": layers,
    }
