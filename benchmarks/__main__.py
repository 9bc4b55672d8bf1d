"""Run the benchmarks and write BENCHMARKS.md (tables) and benchmarks/results/*.png (plots).

    python -m benchmarks            # full: whole Fashion-MNIST test split (about 30 minutes on 2 CPU cores)
    python -m benchmarks --quick    # a few minutes: 500 test images, fewer settings

Fine-tuning and the attention variants have their own command (about an hour):
``python -m benchmarks.finetune``; its section of BENCHMARKS.md is kept by this one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from benchmarks import calibration as cal_bench
from benchmarks import outputs
from benchmarks.core import calibration_images, fidelity, machine_info, peak_memory_mb, timing, write_whole
from convert import DEFAULTS
from convert.plots import png_bytes, sweep_figure
from convert.run import sweep_rows
from models.data import fashion_mnist
from models.zoo import create_ann

CHECK_T = (1, 2, 4, 8, 16, 32)


def core(eval_images, max_t, memory_t, quick):
    ann = create_ann("vit_fmnist")
    data = fashion_mnist("test")
    test = data.dataset if eval_images is None else Subset(data.dataset, range(eval_images))
    calib = calibration_images()
    fid = {f"L={L}": fidelity(ann, calib, test, max_t, L) for L in (1, 4)}
    big = {}
    if not quick:  # where Linear layers dominate: ViT-B/16 at 224 px, random weights
        import timm
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        big = {"timing_vit_base_batch8": timing(vit_b, torch.randn(8, 3, 224, 224), repeats=1)}
    return {**machine_info(data.source), "images": len(test), "fidelity": fid, **big,
            "timing": timing(ann, calib[:64]), "timing_batch1": timing(ann, calib[:1]),
            "peak_memory_mb": {m: {T: peak_memory_mb(m, T) for T in memory_t} for m in ("s", "m")}}


def markdown(core_res, cal_res, command) -> str:
    lines = ["# Benchmarks", "",
             f"Measured with `{command}` on {core_res['date']}: {core_res['machine']}; "
             f"data: Fashion-MNIST test split ({core_res['images']} images) from {core_res['data']}. "
             "Ratios are measured within one run.", "",
             "## Fidelity: vit_fmnist, training-free (defaults: signed IF, "
             f"{DEFAULTS['calibration']} thresholds, per channel, no correction)", "",
             "| neuron | ANN top-1 | " + " | ".join(f"T={t}" for t in CHECK_T) + " |",
             "|---|---|" + "---|" * len(CHECK_T)]
    for name, res in core_res["fidelity"].items():
        cells = [f"{res['top1'][t - 1]:.2f} ({res['agreement'][t - 1]:.1f})" if t <= len(res["top1"]) else "-"
                 for t in CHECK_T]
        lines.append(f"| signed IF {name} | {res['ann_top1']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: SNN top-1 % (agreement with the ANN's predictions, %). One anytime run per row.", "",
              "![accuracy vs T](benchmarks/results/fidelity.png)", "",
              "## Speed: one SNN timestep relative to one ANN forward, measured in the same process", ""]
    for key, label in (("timing", "64"), ("timing_batch1", "1"), ("timing_vit_base_batch8", "8, ViT-B/16 224 px")):
        if key not in core_res:
            continue
        t = core_res[key]
        lines.append(f"- batch {label}: one ANN forward {t['ann_forward_s'] * 1e3:.1f} ms; one SNN timestep "
                     f"{t['snn_step_s_s'] / t['ann_forward_s']:.2f}x of it in step mode, "
                     f"{t['snn_step_s_m'] / t['ann_forward_s']:.2f}x in multi-step mode (T=8)")
    lines += ["", "## Peak memory of simulating T steps (batch 64, MB above the loaded model)", "",
              "| mode | " + " | ".join(f"T={T}" for T in next(iter(core_res["peak_memory_mb"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(core_res["peak_memory_mb"].values())))]
    for mode, row in core_res["peak_memory_mb"].items():
        lines.append(f"| {'step' if mode == 's' else 'multi-step'} | " + " | ".join(f"{v:.0f}" for v in row.values())
                     + " |")
    if core_res.get("peak_memory_note"):
        lines += ["", f"({core_res['peak_memory_note']}.)"]
    if cal_res:
        lines += ["", "## Calibration methods and corrections (training-free)", "",
                  "T-specific settings (mse, bias correction) are calibrated for T=8 (L=1) or T=4 (L=4).", "",
                  "| setting | target T | " + " | ".join(f"T={t}" for t in CHECK_T[:5]) + " | calibration s |",
                  "|---|---|" + "---|" * 5 + "---|"]
        for name, res in cal_res["table"].items():
            drop = [f"{res['top1'][t - 1]:.2f} ({res['ann_top1'] - res['top1'][t - 1]:+.2f})" for t in CHECK_T[:5]]
            lines.append(f"| {name} | {res['target_t']} | " + " | ".join(drop) + f" | {res['calibration_s']:.1f} |")
        lines += ["", "Cells: SNN top-1 % (drop vs the ANN, points).", "", "Best training-free setting per T:"]
        for t in CHECK_T[:5]:
            for L in sorted({name.split()[0] for name in cal_res["table"]}):
                rows = {n: r for n, r in cal_res["table"].items() if n.startswith(L + " ")}
                best = max(rows, key=lambda n: rows[n]["top1"][t - 1])
                lines.append(f"- T={t}, {L}: {best.split(' ', 1)[1]} ({rows[best]['top1'][t - 1]:.2f}%)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the tables from results.json (no measurement)")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / "results.json").read_text())
        old = args.markdown.read_text()
        keep = old[old.index("<!-- "):] if "<!-- " in old else ""
        command = old.split("Measured with `", 1)[1].split("`", 1)[0]
        write_whole(args.markdown, markdown(saved["core"], saved["calibration"], command) + "\n" + keep)
        return
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    eval_images = 500 if args.quick else None
    core_res = core(eval_images, 8 if args.quick else 32, (1, 8) if args.quick else (1, 4, 16, 32), args.quick)
    methods = {k: v for k, v in cal_bench.METHODS.items() if k in ("p99.9", "p99.5 per-channel")} if args.quick \
        else cal_bench.METHODS
    cal_res = cal_bench.run(eval_images, levels=(1,) if args.quick else (1, 4), methods=methods)
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / "results.json", json.dumps({"core": core_res, "calibration": cal_res}, indent=2))
    rows = [r for name, res in core_res["fidelity"].items() for r in sweep_rows(f"signed IF {name}", res)]
    ann_top1 = next(iter(core_res["fidelity"].values()))["ann_top1"]
    write_whole(args.out / "fidelity.png", png_bytes(sweep_figure(rows, ann_top1, "vit_fmnist on Fashion-MNIST")))
    old = args.markdown.read_text() if args.markdown.exists() else ""
    keep = old[old.index("<!-- "):] if "<!-- " in old else ""  # the other benchmarks' sections
    write_whole(args.markdown, markdown(core_res, cal_res, command) + "\n" + keep)
    outputs.write_section(args.markdown, outputs.markdown(outputs.run(64 if args.quick else 256), command))
    print(f"wrote {args.markdown} and {args.out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
