"""Do the default thresholds carry over? Every Fashion-MNIST reference model x T x alphabet, defaults only.

    python -m benchmarks.generalization [--models vit_fmnist vit_fmnist_gap ...] [--eval-images N]
                                        [--timesteps 1 2 4 8 16 32 64] [--levels 1 4 16] [--levels-max-t 16]
                                        [--option KEY=VALUE ...] [--add]

For every model with weights in models/assets/ (``python -m models.train_reference --model NAME`` makes
them) and every alphabet L, one conversion per T with the default options (signed IF, thresholds chosen
for that T and L, training-free), calibrated on 512 training images and evaluated at step T on the test
split. Multi-level alphabets run up to ``--levels-max-t`` (their targets are from T=4). For comparison the
previous default (per-channel percentile 99.5, L=1) is run once to the largest T (its thresholds do not
depend on T, so one anytime run gives every T). Conversion (calibration) seconds of both are recorded.
Writes benchmarks/results/generalization.json and generalization.png and the section of BENCHMARKS.md
between the ``generalization`` markers. ``--option`` (convert()'s keyword, a YAML value) measures the same grid
with options on top of the defaults, kept beside the defaults' run as its own entry (beside the same model's
default cells, and not in the plot, which shows the defaults). ``--add`` adds the run's cells to the saved entry
of the same model and options (measured on as many test images) instead of replacing it, without the previous
default's run; the entry lists every command that measured its cells.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks import outputs
from benchmarks.core import calibration_images, command_line, machine_info, parse_options, write_whole
from convert import convert
from convert.evaluate import evaluate
from convert.plots import png_bytes
from models.data import fashion_mnist
from models.zoo import ASSETS, FMNIST_MODELS, create_ann

RESULTS = Path("benchmarks/results")
START, END = "<!-- generalization:start -->", "<!-- generalization:end -->"


def entry_name(model: str, options: dict) -> str:
    return model if not options else model + " with " + ", ".join(f"{k}={v}" for k, v in options.items())


def run(models, timesteps, levels, levels_max_t, eval_images, options=None, baseline=True) -> dict:
    test_data = fashion_mnist("test")
    test = test_data.dataset if eval_images is None else Subset(test_data.dataset, range(eval_images))
    loader = DataLoader(test, batch_size=250)
    calib = calibration_images()
    command = command_line("benchmarks.generalization")
    out = {"models": {}}
    for name in models:
        ann = create_ann(name)
        res = {**machine_info(test_data.source), "images": len(test), "command": command, "defaults": {},
               "convert_s": {}, "model": name, "options": dict(options or {})}
        for L in levels:
            row = {}
            for T in [t for t in timesteps if L == 1 or t <= levels_max_t]:
                t0 = time.time()
                snn = convert(ann, calib, timesteps=T, levels=L, progress=False, **res["options"])
                res["convert_s"].setdefault(f"L={L}", {})[T] = time.time() - t0
                r = evaluate(snn, loader, T, progress=False)
                res["ann_top1"] = r["ann_top1"]
                row[T] = {"top1": r["top1"][-1], "agreement": r["agreement"][-1]}
                print(f"{name} L={L} T={T}: {row[T]['top1']:.2f} (ANN {r['ann_top1']:.2f})", file=sys.stderr,
                      flush=True)
            res["defaults"][f"L={L}"] = row
        if options or not baseline:  # the previous default's run belongs to the defaults' entry
            out["models"][entry_name(name, options)] = res
            continue
        t0 = time.time()
        snn = convert(ann, calib, timesteps=max(timesteps), calibration="percentile", progress=False)
        res["convert_s"]["percentile"] = time.time() - t0
        r = evaluate(snn, loader, max(timesteps), progress=False)
        res["percentile_L1"] = {T: {"top1": r["top1"][T - 1], "agreement": r["agreement"][T - 1]} for T in timesteps}
        out["models"][name] = res
    return out


def markdown(res: dict) -> str:
    lines = ["Default options only (signed IF, MSE-optimal per-channel and per-token thresholds for the run's T "
             "and L, training-free, 512 calibration images from the training split); one conversion per T, accuracy "
             "at step T. Each cell: ANN minus SNN top-1 (pt); in brackets the previous default (percentile 99.5, "
             "L=1). An entry \"with KEY=VALUE\" adds that convert() option to the defaults (`--option`).", ""]
    for name, m in res["models"].items():
        Ts = sorted({int(t) for row in m["defaults"].values() for t in row})
        base = res["models"].get(m.get("model", name), {}) if m.get("options") else None
        note = "" if base is None else " In brackets: the defaults' cell (above)."
        runs = m.get("runs", [[m["command"], m["date"]]])
        if len({date for _, date in runs}) == 1:
            measured = "`" + "`, `".join(c for c, _ in runs) + f"` on {runs[0][1]}"
        else:
            measured = ", ".join(f"`{c}` ({date})" for c, date in runs)
        lines += [f"**{name}** (ANN {m['ann_top1']:.2f}%): {measured}, {m['machine']}; "
                  f"{m['images']} test images ({m['data']}).{note}", "",
                  "| L | " + " | ".join(f"T={t}" for t in Ts) + " |", "|---|" + "---|" * len(Ts)]
        for L, row in m["defaults"].items():
            cells = []
            for t in Ts:
                cell = row.get(str(t))
                if cell is None:
                    cells.append("-")
                    continue
                text = f"{m['ann_top1'] - cell['top1']:+.2f}"
                if base is not None:
                    old = base.get("defaults", {}).get(L, {}).get(str(t))
                else:
                    old = m["percentile_L1"].get(str(t)) if L == "L=1" else None
                cells.append(text + (f" ({m['ann_top1'] - old['top1']:+.2f})" if old else ""))
            lines.append(f"| {L[2:]} | " + " | ".join(cells) + " |")
        cs = m["convert_s"]
        if "percentile" not in cs:
            lines.append("")
            continue
        t_max = max(cs["L=1"], key=int)
        lines += ["", f"Conversion (calibration) time at T={t_max}, L=1: {cs['L=1'][t_max]:.1f} s (percentile 99.5: "
                  f"{cs['percentile']:.1f} s, ratio {cs['L=1'][t_max] / cs['percentile']:.2f}).", ""]
    return "\n".join(lines)


def figure(res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    defaults = {name: m for name, m in res["models"].items() if not m.get("options")}
    for i, (name, m) in enumerate(defaults.items()):
        color = f"C{i}"
        for L, style in zip(m["defaults"], ("-", "--", ":")):
            row = {int(t): v for t, v in m["defaults"][L].items()}
            ax.plot(sorted(row), [row[t]["top1"] for t in sorted(row)], style, marker="o", ms=3, color=color,
                    label=f"{name} {L}")
        ax.axhline(m["ann_top1"], color=color, lw=0.6, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("timesteps T (thresholds chosen for each T)")
    ax.set_ylabel("SNN top-1 (%)  (thin lines: ANN)")
    ax.set_title("Fashion-MNIST reference models, default options, training-free")
    lo = min(min(v["top1"] for v in row.values()) for m in defaults.values() for row in m["defaults"].values())
    ax.set_ylim(max(lo - 2, 0), max(m["ann_top1"] for m in defaults.values()) + 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def added(saved: dict, new: dict) -> dict:
    """``saved`` with ``new``'s cells and conversion seconds on top, and its command and date appended."""
    out = {**saved, "runs": saved.get("runs", [[saved["command"], saved["date"]]]) + [[new["command"], new["date"]]]}
    for key in ("defaults", "convert_s"):
        out[key] = {**saved[key], **{L: {**saved[key].get(L, {}), **row} for L, row in new[key].items()
                                     if isinstance(row, dict)}}
    return out


def write_section(path: Path, body: str) -> None:
    outputs.write_section(path, f"{START}\n## Do the defaults generalise? Models x T x alphabet\n\n{body}\n{END}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    have = [n for n in FMNIST_MODELS if (ASSETS / f"{n}.safetensors").is_file()]
    parser.add_argument("--models", nargs="+", default=have, choices=list(FMNIST_MODELS))
    parser.add_argument("--eval-images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--levels-max-t", type=int, default=16)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a convert() option on top of the defaults (YAML value), e.g. centre_values=true")
    parser.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--add", action="store_true",
                        help="add the cells to the saved entry (same model, options and test images) instead of "
                             "replacing it")
    args = parser.parse_args(argv)
    try:
        options = parse_options(args.option)
    except ValueError as exc:
        parser.error(str(exc))
    torch.manual_seed(0)
    saved = RESULTS / "generalization.json"
    old = json.loads(saved.read_text())["models"] if saved.is_file() else {}
    if args.add:
        images = args.eval_images or len(fashion_mnist("test").dataset)
        for name in (entry_name(n, options) for n in args.models):
            if name not in old:
                parser.error(f"--add: no saved entry for {name} in {saved}: run it without --add first")
            if old[name]["images"] != images:
                parser.error(f"--add: the saved {name} cells are on {old[name]['images']} test images, this run "
                             f"would be on {images}: use --eval-images {old[name]['images']}")
    res = run(args.models, sorted(args.timesteps), args.levels, args.levels_max_t, args.eval_images, options,
              baseline=not args.add)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = json.loads(json.dumps(res))  # the table and plot read what the JSON file holds (string keys)
    if args.add:
        res["models"] = {name: added(old[name], new) for name, new in res["models"].items()}
    if old:  # models measured by earlier runs stay (each with its own command and image count)
        res["models"] = {**old, **res["models"]}
        order = {n: i for i, n in enumerate(FMNIST_MODELS)}  # by model, each model's defaults first
        res["models"] = dict(sorted(res["models"].items(),
                                    key=lambda kv: (order[kv[1].get("model", kv[0])], bool(kv[1].get("options")))))
    write_whole(saved, json.dumps(res, indent=1))
    if any(not m.get("options") for m in res["models"].values()):  # the plot shows the defaults
        write_whole(RESULTS / "generalization.png", png_bytes(figure(res)))
    write_section(args.benchmarks_md, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
