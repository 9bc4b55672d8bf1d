"""psa (EST's partial-information attention), training-free: accuracy vs mask_p vs the attention's SOPs, for
EST's masks (Q, K and the attention map, Bernoulli at every step) with and without dividing the masked products
by 1 - mask_p, and for masks on Q and K only, random or evenly spread, or on Q alone, each dropping the masked
spikes (EST) or skipping only their fan-out into the product (``mask_fanout``) (``MASKS``). Writes its
section of BENCHMARKS.md; a run on some ``--models`` keeps the saved results of the others, and a run on the same
test images keeps the saved rows of the settings (T, mask_p, masks) it does not measure.

    python -m benchmarks.psa [--models vit_fmnist] [--timesteps 4 8] [--eval-images 2000]
                             [--mask-p 0.1 0.25 0.4 0.5] [--masks NAME ...] [--mask-seeds 1]
    python -m benchmarks.psa --quick     # 300 test images, T=4, mask_p 0.25

For each model, T, mask_p and masking: one conversion (defaults otherwise) per draw of the masks
(``attention.mask_seed`` 0 .. ``--mask-seeds`` - 1), top-1 at step T, the Q K^T and A V SOPs and the energy per image
relative to ecm's (``convert.energy_report`` on 64 test images), each the mean over the draws; the table gives the
draws' range of top-1.
"""
from __future__ import annotations

import argparse
import json

from torch.utils.data import DataLoader, Subset

from benchmarks.core import calibration_images, command_line, machine_info, run_text, with_run
from benchmarks.outputs import benchmark_main
from convert import convert, energy_report
from convert.evaluate import evaluate
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- psa:begin -->", "<!-- psa:end -->"
MASK_P = (0.1, 0.25, 0.4, 0.5)
# name -> psa options besides mask_p
MASKS = {"EST: Q, K, A; random": {}, "EST, rescaled": dict(mask_rescale=True),
         "Q, K; random; rescaled": dict(mask_operands="q+k", mask_rescale=True),
         "Q, K; even; rescaled": dict(mask_operands="q+k", mask_schedule="even", mask_rescale=True),
         "Q; even; rescaled": dict(mask_operands="q", mask_schedule="even", mask_rescale=True),
         "EST, rescaled; fan-out": dict(mask_rescale=True, mask_fanout=True),
         "Q, K; even; rescaled; fan-out": dict(mask_operands="q+k", mask_schedule="even", mask_rescale=True,
                                               mask_fanout=True)}


def _attention_sops(report, which: str) -> float:
    return sum(r.get("sops", 0.0) for n, r in report["layers"].items() if n.endswith(which))


def measure(models, steps, mask_ps, eval_images: int, masks=None, seeds: int = 1) -> dict:
    """``masks``: names in MASKS (default: all); ``seeds``: draws of the masks per setting."""
    test_data = fashion_mnist("test")
    loader = DataLoader(Subset(test_data.dataset, range(eval_images)), batch_size=250)
    energy_x = test_data.dataset.tensors[0][:64]
    calib = calibration_images()
    out = {**machine_info(test_data.source), "images": eval_images, "models": {}}
    for name in models:
        ann = create_ann(name)
        rows = []
        for T in steps:
            settings = [("ecm", 0.0, "-", [{}])] + [
                ("psa", p, m, [dict(attention="psa", mask_p=p, mask_seed=d, **MASKS[m]) for d in range(seeds)])
                for p in mask_ps for m in masks or MASKS]
            base = None
            for attention, p, masking, draws in settings:
                measured = [_measure_one(ann, calib, T, options, loader, energy_x) for options in draws]
                row = {"T": T, "mask_p": p, "masks": masking, "ann_top1": measured[0]["ann_top1"],
                       **{k: sum(m[k] for m in measured) / len(measured) for k in ("top1", "qk", "av", "energy")}}
                if len(measured) > 1:
                    row["draws"] = [m["top1"] for m in measured]
                base = base or row
                row.update(qk_vs_ecm=row["qk"] / base["qk"], av_vs_ecm=row["av"] / base["av"],
                           energy_vs_ecm=row["energy"] / base["energy"], drop_vs_ecm=base["top1"] - row["top1"])
                rows.append(row)
                print(f"{name} T={T} {attention} p={p} {masking}: {row['top1']:.2f} "
                      f"(ecm {base['top1']:.2f}) QK^T SOPs x{row['qk_vs_ecm']:.2f}", flush=True)
        out["models"][name] = {"ann_top1": rows[0]["ann_top1"], "rows": rows}
    return out


def _measure_one(ann, calib, T: int, options: dict, loader, energy_x) -> dict:
    snn = convert(ann, calib, timesteps=T, progress=False, **options)
    r = evaluate(snn, loader, T, progress=False)
    e = energy_report(snn, energy_x)
    return {"top1": r["top1"][-1], "ann_top1": r["ann_top1"], "qk": _attention_sops(e, ".qk"),
            "av": _attention_sops(e, ".av"), "energy": e["energy_snn_pj"]}


def _order(row) -> tuple:
    return row["T"], row["mask_p"], (["-"] + list(MASKS)).index(row["masks"])


def measure_keeping_others(args) -> dict:
    """``measure`` on ``--models``; the saved results of other models stay, each model with its runs (command,
    date, test images). A model measured again on as many test images keeps its saved rows of the settings this
    run does not measure; their drops stay those from the ecm row of their own run (reruns agree to about 0.02 pt)."""
    new = measure(args.models, args.timesteps, args.mask_p, args.eval_images, args.masks, args.mask_seeds)
    run = {"command": command_line("benchmarks.psa"), "date": new["date"], "images": new["images"]}
    saved = args.out / "psa.json"
    old = json.loads(saved.read_text()) if saved.exists() else {"models": {}}
    for m in old["models"].values():
        m["runs"] = _runs(m, old)
    for name, m in new["models"].items():
        prev = old["models"].get(name)
        runs = [run]
        if prev and prev["runs"][-1]["images"] == new["images"]:
            fresh = {_order(r): r for r in m["rows"]}
            m["rows"] = sorted([fresh.pop(_order(r), r) for r in prev["rows"]] + list(fresh.values()), key=_order)
            runs = with_run(prev["runs"], run)
        m["runs"] = runs
    new["models"] = {**old["models"], **new["models"]}
    return new


def _runs(model: dict, res: dict) -> list:
    """A model's runs; results saved before each model kept its runs name one, the model's or the file's."""
    return model.get("runs") or [{k: model.get(k, res.get(k)) for k in ("command", "date", "images")}]


def markdown(res: dict, command: str) -> str:
    lines = [BEGIN, "## psa: accuracy vs mask_p vs SOPs (training-free)", "",
             f"On {res['machine']}: top-1 at step T on the test images each model's run names, "
             "SOPs and energy on 64. Masks: EST's on Q, K and the attention map A, Bernoulli(1 - mask_p) at "
             "every step; `rescaled`: `attention.mask_rescale=true` (the masked products divided by 1 - mask_p; EST "
             "does not rescale); `Q, K`: `attention.mask_operands=q+k`; `Q`: `attention.mask_operands=q`; `even`: "
             "`attention.mask_schedule=even` (each element dropped at an evenly spaced share mask_p of the steps); "
             "`fan-out`: `attention.mask_fanout=true` (a masked spike skips only its fan-out into the product: the "
             "product's running sums keep it). SOPs and energy relative to ecm's at the same T.", ""]
    for name, m in res["models"].items():
        runs = _runs(m, {"command": command, **res})
        lines += [f"### {name} (ANN {m['ann_top1']:.2f}%)", "",
                  f"Measured with {', '.join(map(run_text, runs))}, "
                  f"{runs[-1]['images']} test images.", "",
                  "| T | mask_p | masks | top-1 | drop vs ecm | Q K^T SOPs vs ecm | A V SOPs vs ecm | energy vs ecm |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            draws = f" (mean of {len(r['draws'])} draws: {min(r['draws']):.2f}-{max(r['draws']):.2f})" \
                if "draws" in r else ""
            lines.append(f"| {r['T']} | {r['mask_p']} | {r['masks']} | "
                         f"{r['top1']:.2f}{draws} | {r['drop_vs_ecm']:+.2f} | {r['qk_vs_ecm']:.2f} | "
                         f"{r['av_vs_ecm']:.2f} | {r['energy_vs_ecm']:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _arguments(parser):
    parser.add_argument("--models", nargs="+", default=["vit_fmnist"])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--mask-p", type=float, nargs="+", default=list(MASK_P))
    parser.add_argument("--masks", nargs="+", default=None, choices=list(MASKS), help="default: all")
    parser.add_argument("--mask-seeds", type=_positive, default=1, help="draws of the masks per setting")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    benchmark_main("psa", __doc__, measure_keeping_others,
                   lambda a: measure(a.models[:1], [4], (0.25,), 300), markdown, _arguments)


if __name__ == "__main__":
    main()
