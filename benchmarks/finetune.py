"""Fine-tuning and attention-variant benchmark on vit_fmnist. Writes its section of BENCHMARKS.md.

    python -m benchmarks.finetune            # full test split; about an hour on 2 CPU cores
    python -m benchmarks.finetune --quick    # minutes: 500 test images, 2,048 training images, T=2 only

Defaults (signed IF L=1): training-free vs fine-tuned accuracy at T = 1, 2, 4, 8, each
fine-tuned at its own T for ``--epochs`` epochs (conf/finetune/bptt.yaml settings), with
seconds per epoch and peak memory of training. Variants (psa, ssa, a2os2a,
spike_driven): accuracy at t = 1..8 training-free and after fine-tuning at T=4, SOPs
and energy vs the ecm default and the ANN.
"""
from __future__ import annotations

import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.core import calibration_images, machine_info
from benchmarks.outputs import benchmark_main
from convert import convert, energy_report, finetune
from convert.config import compose_config, finetune_options
from convert.evaluate import evaluate
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- finetune:begin -->", "<!-- finetune:end -->"
VARIANTS = {"ecm (default)": {}, "psa mask_p=0.5": dict(attention="psa", mask_p=0.5), "ssa": dict(attention="ssa"),
            "a2os2a": dict(attention="a2os2a"), "spike_driven": dict(residual="spike_driven")}
# the papers' own ImageNet figures, as context (they train SNNs from scratch or fine-tune at scale)
PAPERS = {"ssa": "Spikformer-8-768: 74.81% top-1 at T=4 (ImageNet)",
          "spike_driven": "Spikingformer-8-768: 75.85% at T=4, 57% less energy than Spikformer (ImageNet)",
          "psa mask_p=0.5": "EST: 78.48% at T=16; PSA -49.8% FLOPs for negligible loss (ImageNet)",
          "a2os2a": "A2OS2A: 78.66% (ImageNet)"}


def training_memory_mb(T: int, grad_checkpoint: bool = False, batch: int = 64) -> float:
    """Peak resident memory (MB, Linux VmHWM) that one fine-tuning step at T adds, in a fresh process."""
    code = (
        "import re, torch; from convert import convert, finetune; from models.zoo import create_ann;"
        "from models.data import load_bundled_fmnist;"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
        f"x, y = load_bundled_fmnist('train').tensors; x, y = x[:{batch}], y[:{batch}];"
        f"snn = convert(create_ann('vit_fmnist'), x[:2], timesteps={T}, progress=False);"
        "open('/proc/self/clear_refs', 'w').write('5');"  # the peak so far starts afresh at the current RSS
        f"base = hwm(); finetune(snn, (x, y), 1, batch_size={batch}, grad_checkpoint={grad_checkpoint}, "
        "progress=False); print((hwm() - base) / 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _tuned(snn, train, epochs, options, T):
    t0 = time.time()
    finetune(snn, train, epochs, **{**options, "timesteps": T})
    return {"seconds_per_epoch": (time.time() - t0) / epochs, "train_loss": snn.finetune_report["loss"]}


def run(eval_images=None, train_images=None, epochs=1, steps=(1, 2, 4, 8), variant_t=4, variants=VARIANTS,
        max_t=8, variant_images=None):
    """``train_images`` / ``variant_images``: training images per epoch for the defaults / the variants (None: all)."""
    torch.manual_seed(0)
    cfg = compose_config(["finetune=bptt", "progress=false", f"finetune.images={train_images or 'null'}"])
    options = finetune_options(cfg)
    ann = create_ann("vit_fmnist")
    data = fashion_mnist("test")
    train = fashion_mnist("train").dataset
    test = data.dataset if eval_images is None else Subset(data.dataset, range(eval_images))
    loader = DataLoader(test, batch_size=256)
    calib = calibration_images()
    energy_images = data.dataset.tensors[0][:128]
    res = {**machine_info(data.source), "images": len(test), "train_images": train_images or len(train),
           "epochs": epochs, "finetune_options": {k: v for k, v in options.items() if k != "progress"},
           "defaults": {}, "variants": {}}
    for T in steps:
        snn = convert(ann, calib, timesteps=T, progress=False)
        free = evaluate(snn, loader, T, progress=False, reference=ann)
        cost = _tuned(snn, train, epochs, options, T)
        tuned = evaluate(snn, loader, T, progress=False, reference=ann)
        memory = {"peak_memory_mb": training_memory_mb(T), "peak_memory_mb_checkpointed": training_memory_mb(T, True)}
        res["defaults"][T] = {"ann_top1": free["ann_top1"], "free": free["top1"][-1], "tuned": tuned["top1"][-1],
                              **cost, **memory}
        print(f"T={T}: free {free['top1'][-1]:.2f} tuned {tuned['top1'][-1]:.2f} ({cost})", flush=True)
    for name, opts in variants.items():
        snn = convert(ann, calib, timesteps=variant_t, progress=False, **opts)
        free = evaluate(snn, loader, max_t, progress=False, reference=ann)
        e_free = energy_report(snn, energy_images, timesteps=variant_t)
        cost = _tuned(snn, train, epochs, {**options, "images": variant_images or options["images"]}, variant_t)
        tuned = evaluate(snn, loader, max_t, progress=False, reference=ann)
        e = energy_report(snn, energy_images, timesteps=variant_t)
        res["variants"][name] = {"free": free["top1"], "tuned": tuned["top1"], **cost,
                                 "energy": {k: e[k] for k in ("snn_sops", "snn_macs", "energy_snn_pj",
                                                             "energy_ann_pj", "energy_snn_strict_pj")},
                                 "energy_free_pj": e_free["energy_snn_pj"]}
        print(f"{name}: free {free['top1'][variant_t - 1]:.2f} tuned {tuned['top1'][variant_t - 1]:.2f}", flush=True)
    res["variant_t"] = variant_t
    res["variant_images"] = variant_images or res["train_images"]
    return res


def markdown(res, command) -> str:
    o = res["finetune_options"]
    ann = next(iter(res["defaults"].values()))["ann_top1"] if res["defaults"] else float("nan")
    lines = [BEGIN, "## Fine-tuning over T and the seed papers' variants", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; {res['images']} test images; fine-tuning "
             f"{res['epochs']} epoch(s) of {res['train_images']} training images (batch {o['batch_size']}, AdamW lr "
             f"{o['lr'] if o['lr'] is not None else 'null (set by the start agreement)'}, {o['surrogate']} "
             f"surrogate, thresholds and weights learned, warm-up {o['warmup']}, cosine). "
             f"ANN top-1: {ann:.2f}%.", "",
             "### Defaults (signed IF L=1), each fine-tuned at its own T", "",
             "| T | training-free | fine-tuned | drop vs ANN | s / epoch | training memory MB (grad_checkpoint) |",
             "|---|---|---|---|---|---|"]
    for T, r in res["defaults"].items():
        lines.append(f"| {T} | {r['free']:.2f} | {r['tuned']:.2f} | {r['ann_top1'] - r['tuned']:+.2f} | "
                     f"{r['seconds_per_epoch']:.0f} | {r['peak_memory_mb']:.0f} ({r['peak_memory_mb_checkpointed']:.0f}) |")
    lines += ["", "Training memory: the peak resident memory one step of batch 64 adds, measured in a fresh process; in "
              "brackets with `finetune.grad_checkpoint=true` (blocks recomputed in the backward pass)."]
    if res.get("note"):
        lines += ["", res["note"]]
    if not res["variants"]:
        return "\n".join(lines + [END]) + "\n"
    T = res["variant_t"]
    steps = [t for t in (1, 2, 4, 8) if t <= len(next(iter(res["variants"].values()))["free"])]
    lines += ["", f"### Attention and residual variants: converted, then fine-tuned at T={T} "
              f"({res.get('variant_images', res['train_images'])} training images; "
              f"{res.get('variant_eval_images', res['images'])} test images)", "",
              "| variant | " + " | ".join(f"T={t} free / tuned" for t in steps) +
              f" | SOPs (M) T={T} | energy vs ANN | vs ecm | paper (context) |",
              "|---|" + "---|" * len(steps) + "---|---|---|---|"]
    ecm = next(iter(res["variants"].values()))["energy"]["energy_snn_pj"]
    for name, r in res["variants"].items():
        e = r["energy"]
        lines.append(f"| {name} | " + " | ".join(f"{r['free'][t - 1]:.1f} / {r['tuned'][t - 1]:.1f}" for t in steps)
                     + f" | {e['snn_sops'] / 1e6:.2f} | {e['energy_snn_pj'] / e['energy_ann_pj']:.2f}x | "
                       f"{e['energy_snn_pj'] / ecm:.2f}x | {PAPERS.get(name, '-')} |")
    lines += ["", "Energy: `energy_report` on 128 test images after fine-tuning (4.6 pJ/MAC, 0.9 pJ/SOP). The "
              "papers' figures are ImageNet results of networks trained for hundreds of epochs; they are context, "
              "not a comparison with this 1.8 MB Fashion-MNIST model.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    benchmark_main(
        "finetune", __doc__,
        run_full=lambda a: run(eval_images=a.eval_images, epochs=a.epochs, steps=tuple(a.steps),
                               variant_images=a.variant_images),
        run_quick=lambda a: run(eval_images=500, train_images=2048, epochs=a.epochs, steps=(2,), variant_t=2,
                                variants={k: VARIANTS[k] for k in ("ecm (default)", "ssa")}, max_t=4),
        markdown=markdown,
        add_arguments=_arguments)


def _arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4, 8], help="T of the defaults' rows")
    parser.add_argument("--eval-images", type=int, default=None, help="test images (default: the whole test split)")
    parser.add_argument("--variant-images", type=int, default=None,
                        help="training images per epoch for the variants (default: the whole train split)")


if __name__ == "__main__":
    main()
