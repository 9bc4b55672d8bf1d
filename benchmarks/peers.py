"""Side by side with SpikingJelly 2.0's STATransformerRecipe on the same network, images and calibration.

    pip install -e '.[bench]'
    python -m benchmarks.peers            # full test split, T = 1, 2, 4, 8, 16 (about 30 minutes on 2 cores)
    python -m benchmarks.peers --model vit_fmnist_p4 [--eval-images N]   # another class-token model, own section
    python -m benchmarks.peers --quick    # 256 test images, T = 2, 4

SpikingJelly's ViT path takes torchvision's VisionTransformer only, so the model is
ported 1:1 (models.torchvision_port; the outputs agree to 1e-5). It is used the way its
ImageNet ViT example does: mode spiking_encoder, MSE thresholds, threshold scale 0.5,
the image fed at step 1 and zeros after, logits summed over T; one conversion per T
(its thresholds depend on T), and so are ours (thresholds chosen for each T; the
largest T's run is anytime and its time is reported). Its spike encoders emit unbounded
graded counts trunc(membrane / threshold) per step. For both sides the table gives the spike
alphabet (the largest count one neuron emitted in one step), mean events per neuron
per step (an event: one unit of count; our multi-threshold neuron: one per spike) and
which operations stay analog.
"""
from __future__ import annotations

import math
import time

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from benchmarks.core import calibration_images, machine_info
from benchmarks.outputs import benchmark_main
from convert import convert
from convert.energy import E_MAC_PJ, E_SOP_PJ, event_costs
from convert.evaluate import evaluate
from models.data import fashion_mnist
from models.neurons import BaseNeuron
from models.state import run_steps
from models.torchvision_port import to_torchvision
from models.zoo import create_ann

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
OURS = {"signed IF L=1 (defaults)": {}, "signed IF L=4": dict(levels=4), "signed IF L=16": dict(levels=16),
        "multi-threshold N=8": dict(neuron="multi_threshold", levels=8, v_init=0.0),
        "signed IF L=127 (SpikingJelly's alphabet)": dict(levels=127)}


class _Counts:
    """Forward hooks on spiking modules: largest level per step and total events per neuron-step.

    ``count_of(module, output)`` returns (levels k of the output k * theta, events)."""

    def __init__(self, modules, count_of):
        self.max, self.events, self.elements = 0.0, 0.0, 0
        self.handles = [m.register_forward_hook(self._hook(count_of)) for m in modules]

    def _hook(self, count_of):
        def hook(module, inputs, output):
            levels, events = count_of(module, output)
            self.max = max(self.max, float(levels.abs().max()))
            self.events += float(events.sum())
            self.elements += output.numel()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def result(self):
        return {"alphabet": self.max, "events_per_neuron_step": self.events / max(1, self.elements)}


def _sj_counts(module, output):
    from spikingjelly.activation_based.ann2snn.recipes.sta_transformer import _broadcast_channel_vector
    theta = _broadcast_channel_vector(module.v_threshold, output, module.channel_dim).clamp(min=1e-12)
    counts = torch.round(output / theta).abs()
    return counts, counts


def _our_counts(module, output):
    return module.integer_levels(output), module.events(output)


def sta_forward(snn, x: torch.Tensor, T: int) -> torch.Tensor:
    """SpikingJelly's STA network on images ``x`` as its ImageNet ViT example runs it: the image at step 1, zeros
    after, the logits summed over T."""
    from spikingjelly.activation_based import functional
    functional.reset_net(snn)
    seq = torch.zeros((T, *x.shape), dtype=x.dtype)
    seq[0] = x
    return snn(seq).sum(0)


def sta_energy(snn, x: torch.Tensor, T: int) -> dict:
    """Energy per image of SpikingJelly's STA network on images ``x``, by convert.energy's rules (4.6 pJ per MAC,
    0.9 pJ per SOP): a layer fed by a spike encoder costs |k| x fan-out SOPs (strict: fan-out MACs for each
    |k| > 1); a layer fed analog values costs its dense MACs at every step whose input is not zero (the image
    arrives at step 1 only); TDLayerNorm, TDGELU and the softmax one MAC per element per step; the attention's
    products of two real operands dense MACs per step. Returns pJ per image (standard, strict), the MACs and
    SOPs of both accountings and the encoders' events per neuron per step."""
    from spikingjelly.activation_based.ann2snn.operators import (TDConv2d, TDGELU, TDLayerNorm, TDLinear,
                                                                 TDMultiheadAttention)
    from spikingjelly.activation_based.ann2snn.recipes.sta_transformer import (_STASpikeEncoder,
                                                                              _broadcast_channel_vector)
    encoders = {}  # storage of a spike encoder's output -> (the encoder, the output, kept so that no analog
    # tensor reuses the storage during the run); views and slices of the output share it
    c = dict(macs=0.0, sops=0.0, strict_macs=0.0, strict_sops=0.0, events=0.0, neurons=0)

    def levels(v):
        """|k| of a spike encoder's output (or a view of it), None for analog values."""
        encoder, _ = encoders.get(v.untyped_storage().data_ptr(), (None, None))
        if encoder is None:
            return None
        theta = _broadcast_channel_vector(encoder.v_threshold, v, encoder.channel_dim)
        return torch.round(v / theta.clamp(min=1e-12)).abs()

    def synapse(v, fan_out: float, dense_per_step: float):
        """``v``: [T, B, ...] input of a layer; ``dense_per_step``: its dense MACs per step and image."""
        k = levels(v)
        if k is None:
            analog(dense_per_step * float(v.flatten(2).ne(0).any(-1).sum()))
            return
        sops, strict_sops, strict_macs = event_costs(k, k, fan_out)  # an encoder's count k is k events
        c["sops"] += sops
        c["strict_sops"] += strict_sops
        c["strict_macs"] += strict_macs

    def analog(elements: float):
        c["macs"] += elements
        c["strict_macs"] += elements

    def hook(module, inputs, output):
        v = inputs[0]
        if isinstance(module, _STASpikeEncoder):
            encoders[output.untyped_storage().data_ptr()] = (module, output)
            k = levels(output)
            c["events"] += float(k.sum())
            c["neurons"] += k.numel()
        elif isinstance(module, TDLinear):
            synapse(v, module.out_features, v[0, 0].numel() * module.out_features)
        elif isinstance(module, TDConv2d):
            per_step = output[0, 0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
            synapse(v, per_step / v[0, 0].numel(), per_step)
        elif isinstance(module, TDMultiheadAttention):  # its projections are called directly, so no hooks of theirs
            tokens, dim = v.shape[-2], v.shape[-1]
            synapse(v, 3 * dim, 3 * tokens * dim * dim)  # q, k, v projections of the (spike) input
            steps = v.shape[0] * v.shape[1]
            analog(steps * (2 * tokens * tokens * dim + module.num_heads * tokens * tokens + tokens * dim * dim))
        elif isinstance(module, (TDLayerNorm, TDGELU)):
            analog(v.numel())

    handles = [m.register_forward_hook(hook) for m in snn.modules()
               if isinstance(m, (_STASpikeEncoder, TDLinear, TDConv2d, TDMultiheadAttention, TDLayerNorm, TDGELU))]
    try:
        with torch.no_grad():
            sta_forward(snn, x, T)
    finally:
        for h in handles:
            h.remove()
    n = len(x)
    return {"energy_pj": (c["macs"] * E_MAC_PJ + c["sops"] * E_SOP_PJ) / n,
            "strict_pj": (c["strict_macs"] * E_MAC_PJ + c["strict_sops"] * E_SOP_PJ) / n,
            **{k: v / n for k, v in c.items() if k not in ("events", "neurons")},
            "events": c["events"] / max(1, c["neurons"])}


def spikingjelly_run(tv, calib, test_x, test_y, T, stats_images=256, batch_size=256, energy_images=None):
    """Top-1 at T, seconds, alphabet and events of SpikingJelly's STA conversion for T; with ``energy_images``
    also their ``sta_energy`` (key 'energy')."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import Converter, STATransformerRecipe
    from spikingjelly.activation_based.ann2snn.recipes.sta_transformer import _STASpikeEncoder
    calib_loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=64)
    t0 = time.perf_counter()
    recipe = STATransformerRecipe(dataloader=calib_loader, time_steps=T, mode="spiking_encoder",
                                  threshold_mode="mse", threshold_scale=0.5)
    snn = Converter(recipe=recipe, device=torch.device("cpu")).convert(tv).eval()
    convert_s = time.perf_counter() - t0
    functional.set_step_mode(snn, "m")
    correct, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(test_x), batch_size):
            logits = sta_forward(snn, test_x[i:i + batch_size], T)
            correct += int((logits.argmax(-1) == test_y[i:i + batch_size]).sum())
    eval_s = time.perf_counter() - t0
    counts = _Counts([m for m in snn.modules() if isinstance(m, _STASpikeEncoder)], _sj_counts)
    with torch.no_grad():
        sta_forward(snn, test_x[:stats_images], T)
    counts.remove()
    energy = {} if energy_images is None else {"energy": sta_energy(snn, energy_images, T)}
    return {"top1": 100.0 * correct / len(test_x), "convert_s": convert_s, "evaluate_s": eval_s, **counts.result(),
            **energy}


def ours_run(ann, calib, test, steps, options, stats_images=256):
    """Top-1 at each T of ``steps`` from a conversion for that T (its thresholds depend on T), and the largest T's
    anytime run (every t up to it from one simulation: 'anytime_top1', its seconds, alphabet and events)."""
    loader = DataLoader(test, batch_size=256)
    top1 = {}
    for T in steps[:-1]:
        top1[T] = evaluate(convert(ann, calib, timesteps=T, progress=False, **options), loader, T,
                           progress=False)["top1"][-1]
    T_max = steps[-1]
    t0 = time.perf_counter()
    snn = convert(ann, calib, timesteps=T_max, progress=False, **options)
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(snn, loader, T_max, progress=False, reference=ann)
    eval_s = time.perf_counter() - t0
    top1[T_max] = res["top1"][-1]
    x = torch.stack([test[i][0] for i in range(min(stats_images, len(test)))])
    counts = _Counts([m for m in snn.net.modules() if isinstance(m, BaseNeuron)], _our_counts)
    with torch.no_grad():
        run_steps(snn.net, x, T_max, snn.step_mode)
    counts.remove()
    return {"top1": top1, "anytime_top1": res["top1"], "ann_top1": res["ann_top1"], "convert_s": convert_s,
            "evaluate_s": eval_s, **counts.result()}


def run(model="vit_fmnist", eval_images=None, steps=(1, 2, 4, 8, 16)):
    torch.manual_seed(0)
    ann = create_ann(model)
    tv = to_torchvision(ann)
    data = fashion_mnist("test")
    test = data.dataset if eval_images is None else Subset(data.dataset, range(eval_images))
    test_x = torch.stack([test[i][0] for i in range(len(test))])
    test_y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    calib = calibration_images()
    with torch.no_grad():
        port_error = float((ann(test_x[:256]) - tv(test_x[:256])).abs().max())
    import spikingjelly
    res = {**machine_info(data.source), "model": model, "images": len(test), "steps": list(steps),
           "port_max_abs_error": port_error,
           "spikingjelly": spikingjelly.__version__ if hasattr(spikingjelly, "__version__") else "2.0",
           "sj": {}, "ours": {}}
    for T in steps:
        res["sj"][T] = spikingjelly_run(tv, calib, test_x, test_y, T)
        print(f"SpikingJelly T={T}: {res['sj'][T]}", flush=True)
    for name, options in OURS.items():
        res["ours"][name] = ours_run(ann, calib, test, list(steps), options)
        print(f"ours {name}: {res['ours'][name]['top1']}", flush=True)
    return res


def markers(model: str):
    """BENCHMARKS.md section markers for ``model``'s comparison (vit_fmnist: BEGIN, END)."""
    return (BEGIN, END) if model == "vit_fmnist" else (f"<!-- peers-{model}:begin -->", f"<!-- peers-{model}:end -->")


def markdown(res, command) -> str:
    steps, model = res["steps"], res.get("model", "vit_fmnist")
    ann = next(iter(res["ours"].values()))["ann_top1"]
    begin, end = markers(model)
    lines = [begin, "## Side by side with SpikingJelly (STATransformerRecipe)" + (f": {model}" if begin != BEGIN
                                                                                 else ""), "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; {res['images']} test images, the same "
             f"512 calibration images for both; {model} ported 1:1 to torchvision's ViT (largest output "
             f"difference {res['port_max_abs_error']:.1e}). ANN top-1 {ann:.2f}%. SpikingJelly as in its ImageNet ViT "
             "example: spiking_encoder mode, MSE thresholds, threshold scale 0.5, image at step 1 only, one conversion "
             "per T. Ours: one conversion per T as well (the thresholds are chosen for T); the largest T's conversion "
             "is one anytime run that gives every t up to it, and its seconds are the evaluate column.", "",
             "| method | " + " | ".join(f"T={t}" for t in steps) + " | alphabet (max count / step) | "
             "events / neuron / step | evaluate s (T=" + str(max(steps)) + ") |",
             "|---|" + "---|" * len(steps) + "---|---|---|"]
    sj = res["sj"]
    last = sj[max(steps)] if max(steps) in sj else sj[str(max(steps))]
    get = lambda d, t: d[t] if t in d else d[str(t)]  # noqa: E731  (json keys are strings)
    lines.append("| SpikingJelly STA | " + " | ".join(f"{get(sj, t)['top1']:.2f}" for t in steps) +
                 f" | {last['alphabet']:.0f} (unbounded) | {last['events_per_neuron_step']:.3f} | "
                 f"{last['evaluate_s']:.1f} |")
    for name, r in res["ours"].items():
        lines.append(f"| ours, {name} | " + " | ".join(f"{get(r['top1'], t):.2f}" for t in steps) +
                     f" | {r['alphabet']:.0f} | {r['events_per_neuron_step']:.3f} | {r['evaluate_s']:.1f} |")
    lines += ["", "Alphabet and events at the largest T on 256 test images. What stays analog: SpikingJelly's "
              "converted graph runs LayerNorm, GELU and the whole multi-head attention as time-difference modules "
              "(TDLayerNorm, TDGELU, TDMultiheadAttention: softmax and both products on graded inputs), with spike "
              "encoders in front of the Linear layers; ours computes LayerNorm, GELU and softmax in expectation "
              "(analog) and feeds Q K^T and A V with spikes (the rescaling of the running product stays analog). "
              "SpikingJelly's evaluate time is for its T=" + str(max(steps)) + " conversion alone; ours covers "
              "every T up to it in one run.", end]
    return "\n".join(lines) + "\n"


def _arguments(parser):
    parser.add_argument("--model", default="vit_fmnist", help="a class-token model of models.zoo (torchvision's "
                        "ViT has no other pooling)")
    parser.add_argument("--eval-images", type=int, default=None, help="default: the whole test split")


def main() -> None:
    benchmark_main("peers", __doc__, run_full=lambda a: run(a.model, a.eval_images),
                   run_quick=lambda a: run(a.model, eval_images=256, steps=(2, 4)), markdown=markdown,
                   add_arguments=_arguments, variant=lambda a: "" if a.model == "vit_fmnist" else "-" + a.model)


if __name__ == "__main__":
    main()
