"""Where a conversion loses its accuracy: each kind of neuron spiking alone, and every neuron but that kind.

    python -m benchmarks.error_sources [--models vit_fmnist_p4 vit_fmnist_gap vit_fmnist] [--timesteps 8]
                                       [--eval-images 2000] [--option KEY=VALUE ...]
    python -m benchmarks.error_sources --quick   # vit_fmnist, T=4, 250 test images

The neurons of a converted network are grouped by their place in a block: the module path without the block
indices (``blocks.3.attn.attend.attn_neuron`` -> ``blocks.attn.attend.attn_neuron``). For every group, one
evaluation at step T with only that group spiking (the others analog: exactly the identity, the function a
neuron converges to, unsigned ones included) and one with every neuron spiking but that group, beside the fully spiking network; each as the
drop from the ANN's top-1 on the same images. A group whose spikes alone cost much, and whose analog
version recovers much, is where thresholds, alphabet or coding can buy accuracy. Writes
benchmarks/results/error_sources.json and its section of BENCHMARKS.md.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.core import calibration_images, machine_info, parse_options
from benchmarks.outputs import benchmark_main
from calibration.statistics import analog_mode
from convert import convert
from convert.evaluate import evaluate
from models.data import fashion_mnist
from models.neurons import BaseNeuron
from models.zoo import create_ann

BEGIN, END = "<!-- error_sources:begin -->", "<!-- error_sources:end -->"


def neuron_groups(net: nn.Module) -> Dict[str, List[BaseNeuron]]:
    """The spiking neurons of ``net`` by their module path without numeric parts (block and stage indices)."""
    groups: Dict[str, List[BaseNeuron]] = defaultdict(list)
    for name, module in net.named_modules():
        if isinstance(module, BaseNeuron):
            groups[".".join(p for p in name.split(".") if not p.isdigit()) or "(root)"].append(module)
    return dict(sorted(groups.items()))


def top1_with_spiking(snn, ann: nn.Module, loader, T: int, spiking: Iterable[BaseNeuron]) -> float:
    """Top-1 at step T with the neurons in ``spiking`` spiking and every other neuron analog (exactly the
    identity: ``analog_mode(exact=True)``); afterwards every neuron spikes again. The ANN is the reference
    (the SNN's own analog mode would switch every neuron)."""
    chosen = {id(n) for n in spiking}
    analog = [n for n in snn.net.modules() if isinstance(n, BaseNeuron) and id(n) not in chosen]
    with analog_mode(snn.net, exact=True, only=analog):
        return evaluate(snn, loader, T, progress=False, reference=ann)["top1"][-1]


def sources(snn, ann: nn.Module, loader, T: int) -> dict:
    """{"ann", "spiking", "groups": {group: {"neurons", "alone", "all_but"}}}: top-1 (%) of the ANN, of the fully
    spiking SNN, and per group with only it spiking ("alone") and with all but it spiking ("all_but")."""
    groups = neuron_groups(snn.net)
    full = evaluate(snn, loader, T, progress=False, reference=ann)
    out = {"ann": full["ann_top1"], "spiking": full["top1"][-1], "groups": {}}
    for g, ns in groups.items():
        others = [n for h, m in groups.items() if h != g for n in m]
        out["groups"][g] = {"neurons": len(ns), "alone": top1_with_spiking(snn, ann, loader, T, ns),
                            "all_but": top1_with_spiking(snn, ann, loader, T, others)}
    return out


def measure(models: List[str], T: int, eval_images: Optional[int], options: dict) -> dict:
    data = fashion_mnist("test")
    test = data.dataset if eval_images is None else Subset(data.dataset, range(eval_images))
    loader, calib = DataLoader(test, batch_size=250), calibration_images()
    res = {**machine_info(data.source), "images": len(test), "timesteps": T, "options": options, "models": {}}
    for name in models:
        ann = create_ann(name)
        snn = convert(ann, calib, timesteps=T, progress=False, **options)
        res["models"][name] = sources(snn, ann, loader, T)
        r = res["models"][name]
        print(f"{name} T={T}: ANN {r['ann']:.2f}, SNN {r['spiking']:.2f}", flush=True)
    return res


def markdown(res: dict, command: str) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in res["options"].items()) or "the defaults"
    lines = [BEGIN, "## Where the accuracy goes: each kind of neuron spiking alone, and all but it", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; {res['images']} test images, T="
             f"{res['timesteps']}, {opts}, training-free. Drop (pt) from the ANN's top-1 at step T with only that "
             f"kind of neuron spiking (the rest analog), and with every neuron spiking but that kind (its recovery: "
             f"the fully spiking network's drop minus this one). Kinds: the module path without block indices.", ""]
    for name, r in res["models"].items():
        drop = r["ann"] - r["spiking"]
        lines += [f"**{name}** (ANN {r['ann']:.2f}%, fully spiking drop {drop:+.2f})", "",
                  "| neurons | count | drop, alone spiking | drop, all but these spiking | recovered |",
                  "|---|---|---|---|---|"]
        for g, v in sorted(r["groups"].items(), key=lambda kv: kv[1]["all_but"], reverse=True):
            lines.append(f"| {g} | {v['neurons']} | {r['ann'] - v['alone']:+.2f} | {r['ann'] - v['all_but']:+.2f} | "
                         f"{v['all_but'] - r['spiking']:+.2f} |")
        lines.append("")
    return "\n".join(lines + [END]) + "\n"


def _measure(models: List[str], T: int, eval_images: Optional[int], items: List[str]) -> dict:
    """``measure`` with the command line's options; a bad option or T is one line, not a traceback."""
    try:
        return measure(models, T, eval_images, parse_options(items))
    except ValueError as exc:
        raise SystemExit(str(exc))


def _arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=["vit_fmnist_p4", "vit_fmnist_gap", "vit_fmnist"])
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=2000, help="0: the whole test split")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a convert() option on top of the defaults (YAML value), e.g. levels=4")


if __name__ == "__main__":
    torch.manual_seed(0)
    benchmark_main("error_sources", __doc__,
                   lambda a: _measure(a.models, a.timesteps, a.eval_images or None, a.option),
                   lambda a: _measure(["vit_fmnist"], 4, 250, a.option), markdown, _arguments)
