"""psa (EST's partial-information attention), training-free: accuracy vs mask_p vs the attention's SOPs, for
EST's masks (Q, K and the attention map, Bernoulli at every step) with and without dividing the masked products
by 1 - mask_p, and for masks on Q and K only, random or evenly spread, or on Q alone, each dropping the masked
spikes (EST) or skipping only their fan-out into the product (``mask_fanout``) (``MASKS``). Writes its
section of BENCHMARKS.md; a run on some ``--models`` keeps the saved results of the others.

    python -m benchmarks.psa [--models vit_fmnist] [--timesteps 4 8] [--eval-images 2000]
    python -m benchmarks.psa --quick     # 300 test images, T=4, mask_p 0.25

For each model, T, mask_p and masking: one conversion (defaults otherwise), top-1 at step T, the Q K^T and A V SOPs and
the energy per image relative to ecm's (``convert.energy_report`` on 64 test images).
"""
from __future__ import annotations

import json

from torch.utils.data import DataLoader, Subset

from benchmarks.core import calibration_images, command_line, machine_info
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


def measure(models, steps, mask_ps, eval_images: int) -> dict:
    test_data = fashion_mnist("test")
    loader = DataLoader(Subset(test_data.dataset, range(eval_images)), batch_size=250)
    energy_x = test_data.dataset.tensors[0][:64]
    calib = calibration_images()
    out = {**machine_info(test_data.source), "images": eval_images, "models": {}}
    for name in models:
        ann = create_ann(name)
        rows = []
        for T in steps:
            settings = [("ecm", 0.0, "-", {})] + [("psa", p, name, dict(attention="psa", mask_p=p, **masks))
                                                   for p in mask_ps for name, masks in MASKS.items()]
            base = None
            for attention, p, masking, options in settings:
                snn = convert(ann, calib, timesteps=T, progress=False, **options)
                r = evaluate(snn, loader, T, progress=False)
                e = energy_report(snn, energy_x)
                row = {"T": T, "mask_p": p, "masks": masking, "top1": r["top1"][-1], "ann_top1": r["ann_top1"],
                       "qk": _attention_sops(e, ".qk"), "av": _attention_sops(e, ".av"), "energy": e["energy_snn_pj"]}
                base = base or row
                row.update(qk_vs_ecm=row["qk"] / base["qk"], av_vs_ecm=row["av"] / base["av"],
                           energy_vs_ecm=row["energy"] / base["energy"], drop_vs_ecm=base["top1"] - row["top1"])
                rows.append(row)
                print(f"{name} T={T} {attention} p={p} {masking}: {row['top1']:.2f} "
                      f"(ecm {base['top1']:.2f}) QK^T SOPs x{row['qk_vs_ecm']:.2f}", flush=True)
        out["models"][name] = {"ann_top1": rows[0]["ann_top1"], "rows": rows}
    return out


def measure_keeping_others(args) -> dict:
    """``measure`` on ``--models``; the saved results of other models stay, each model with its own run (command,
    date, test images)."""
    new = measure(args.models, args.timesteps, MASK_P, args.eval_images)
    run = {"command": command_line("benchmarks.psa"), "date": new["date"], "images": new["images"]}
    saved = args.out / "psa.json"
    old = json.loads(saved.read_text()) if saved.exists() else {"models": {}}
    for m in old["models"].values():  # saved before each model kept its own run
        for key in run:
            m.setdefault(key, old[key])
    new["models"] = {**old["models"], **{name: {**m, **run} for name, m in new["models"].items()}}
    return new


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
        lines += [f"### {name} (ANN {m['ann_top1']:.2f}%)", "",
                  f"Measured with `{m.get('command', command)}` on {m.get('date', res['date'])}, "
                  f"{m.get('images', res['images'])} test images.", "",
                  "| T | mask_p | masks | top-1 | drop vs ecm | Q K^T SOPs vs ecm | A V SOPs vs ecm | energy vs ecm |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['T']} | {r['mask_p']} | {r['masks']} | "
                         f"{r['top1']:.2f} | {r['drop_vs_ecm']:+.2f} | {r['qk_vs_ecm']:.2f} | {r['av_vs_ecm']:.2f} | "
                         f"{r['energy_vs_ecm']:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def _arguments(parser):
    parser.add_argument("--models", nargs="+", default=["vit_fmnist"])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--eval-images", type=int, default=2000)


def main() -> None:
    benchmark_main("psa", __doc__, measure_keeping_others,
                   lambda a: measure(a.models[:1], [4], (0.25,), 300), markdown, _arguments)


if __name__ == "__main__":
    main()
