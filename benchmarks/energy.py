"""Accuracy per energy: coding x neuron x levels x T, training-free and fine-tuned, beside SpikingJelly's STA on
the same weights, and the Pareto front of both accountings.

    python -m benchmarks.energy [--models vit_fmnist vit_fmnist_gap] [--eval-images N] [--energy-images 64]
    python -m benchmarks.energy --finetuned 'event penalty 30' ...  # only these fine-tuning runs; the rest stays
    python -m benchmarks.energy --peer      # only SpikingJelly's points; the rest stays
    python -m benchmarks.energy --variants 'rate, signed IF L=16'   # only these grid variants; the rest stays
    python -m benchmarks.energy --quick     # vit_fmnist, 500 test images, a few points

For every model and every point of the grid (rate coding: signed IF L = 1, 2, 4 and the multi-threshold
neuron, L = 16 at T = 1, 2; differential coding: signed IF L = 1, 2, 4 with hysteresis 0, 1/4, 1/2;
T = 1 .. 16), one conversion with the thresholds chosen for that T, top-1 at step T on the test images and the
energy per image of ``convert.energy_report`` (standard: one SOP per event; strict: every value sent with
|k| > 1 is a MAC) on the first ``--energy-images`` of them. Fine-tuned points (``FINETUNED``): one grid point
fine-tuned on the training split with a recipe (conf/finetune/bptt.yaml plus its options), measured after
each of ``EPOCHS`` epochs of one run. SpikingJelly's STA recipe (``benchmarks.peers``) at T = 1, 2, 4, 8 on
the models torchvision's ViT can hold, its energy by the same rules (``benchmarks.peers.sta_energy``). A run
with ``--finetuned``, ``--peer`` or ``--variants`` replaces only its own points in the saved results; a grid
run keeps the saved fine-tuned points and measures the peer's anew. The front keeps the points no other
point, training-free, fine-tuned or the peer's, beats on both accuracy and energy. Writes
benchmarks/results/energy.json and energy.png and the ``energy`` section of BENCHMARKS.md.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.core import (accuracy_and_energy, calibration_images, command_line, finetune_curve, machine_info,
                             write_whole)
from benchmarks.outputs import benchmark_main
from benchmarks.peers import spikingjelly_run
from convert import convert
from convert.plots import png_bytes
from models.data import fashion_mnist
from models.torchvision_port import to_torchvision
from models.zoo import create_ann

BEGIN, END = "<!-- energy:begin -->", "<!-- energy:end -->"
# name -> (convert options, T values)
GRID: Dict[str, tuple] = {
    "rate, signed IF L=1": (dict(), (1, 2, 4, 8, 16)),
    "rate, signed IF L=2": (dict(levels=2), (1, 2, 4, 8)),
    "rate, signed IF L=4": (dict(levels=4), (1, 2, 4, 8)),
    "rate, signed IF L=16": (dict(levels=16), (1, 2)),
    "rate, multi-threshold N=4": (dict(neuron="multi_threshold", levels=4), (1, 2, 4, 8)),
    "differential, signed IF L=1": (dict(coding="differential"), (4, 8, 16)),
    "differential, signed IF L=2": (dict(coding="differential", levels=2), (2, 4, 8)),
    "differential, signed IF L=2, s=1/2": (dict(coding="differential", levels=2, hysteresis=0.5), (4, 8, 16)),
    "differential, signed IF L=4": (dict(coding="differential", levels=4), (2, 4, 8)),
    "differential, signed IF L=4, s=1/4": (dict(coding="differential", levels=4, hysteresis=0.25), (2, 4, 8)),
    "differential, signed IF L=4, s=1/2": (dict(coding="differential", levels=4, hysteresis=0.5), (2, 4, 8)),
}
QUICK = {k: (v[0], (2, 4)) for k, v in GRID.items() if k in
         ("rate, signed IF L=1", "rate, signed IF L=4", "differential, signed IF L=4",
          "differential, signed IF L=4, s=1/2")}


# fine-tuned points: recipe -> (grid variant, T, fine-tuning options on top of conf/finetune/bptt.yaml, epochs);
# the rate is named (1e-3 was the default when these points were measured) but for 'defaults' (lr null: 4.5e-4
# on vit_fmnist there)
FINETUNED: Dict[str, tuple] = {
    "defaults": ("rate, signed IF L=1", 4, {}, 2),
    "lr 1e-3": ("rate, signed IF L=1", 4, dict(lr=1e-3), 2),
    "event penalty 30": ("rate, signed IF L=1", 4, dict(event_penalty=30.0, lr=1e-3), 2),
    "event penalty 10": ("rate, signed IF L=1", 4, dict(event_penalty=10.0, lr=1e-3), 2),
    "event penalty 10, distill 1": ("rate, signed IF L=1", 4, dict(event_penalty=10.0, lr=1e-3, distill=1.0), 2),
    "lr 3e-4": ("rate, signed IF L=1", 4, dict(lr=3e-4), 2),
}
EPOCHS = (0.5, 1, 2)
PEER, PEER_STEPS = "SpikingJelly STA", (1, 2, 4, 8)


def measure(models: List[str], grid: Dict[str, tuple], eval_images, energy_images: int) -> dict:
    test_data = fashion_mnist("test")
    test = test_data.dataset if eval_images is None else Subset(test_data.dataset, range(eval_images))
    loader = DataLoader(test, batch_size=250)
    energy_x = test_data.dataset.tensors[0][:energy_images]
    calib = calibration_images()
    out = {**machine_info(test_data.source), "images": len(test), "energy_images": energy_images, "models": {}}
    for name in models:
        ann = create_ann(name)
        points = []
        for variant, (options, steps) in grid.items():
            for T in steps:
                t0 = time.time()
                snn = convert(ann, calib, timesteps=T, progress=False, **options)
                points.append({"variant": variant, "T": T, **accuracy_and_energy(snn, loader, T, energy_x),
                               "seconds": time.time() - t0})
                p = points[-1]
                print(f"{name} {variant} T={T}: {p['top1']:.2f} (ANN {p['ann_top1']:.2f}) "
                      f"{p['energy']:.3f}x / strict {p['strict']:.3f}x", flush=True)
        out["models"][name] = {"ann_top1": points[0]["ann_top1"], "ann_uj": points[0]["ann_uj"], "points": points}
    return out


def measure_finetuned(models: List[str], recipes: List[str], eval_images, energy_images: int, train_images=None,
                      epochs=EPOCHS) -> dict:
    """The ``FINETUNED`` recipes' points: {"models": {model: {recipe: [point after each of ``epochs``]}}, ...}."""
    test_data = fashion_mnist("test")
    test = test_data.dataset if eval_images is None else Subset(test_data.dataset, range(eval_images))
    train = fashion_mnist("train").dataset
    train = train if train_images is None else Subset(train, range(train_images))
    loader, energy_x, calib = DataLoader(test, batch_size=250), test_data.dataset.tensors[0][:energy_images], \
        calibration_images()
    out = {"images": len(test), "train_images": len(train), "models": {}}
    for name in models:
        ann, out["models"][name] = create_ann(name), {}
        for recipe in recipes:
            variant, T, options, length = FINETUNED[recipe]
            rows = finetune_curve(ann, calib, GRID[variant][0], T, options, length, epochs, loader, train, energy_x,
                                  label=f"{name} {variant} T={T} {recipe}")
            out["models"][name][recipe] = [{"variant": f"{variant} + fine-tuned, {recipe}", "T": T, "epochs": e, **r,
                                            "ann_top1": rows[0]["ann_top1"], "free_top1": rows[0]["top1"]}
                                           for e, r in rows.items() if e]  # the ANN: the unchanged one's
    return out


def measure_peer(models: List[str], eval_images, energy_images: int, steps=PEER_STEPS) -> dict:
    """SpikingJelly's STA recipe on the same weights, test images and calibration (benchmarks.peers), one conversion
    per T, its energy by the same rules (``benchmarks.peers.sta_energy``): {"models": {model: {"SpikingJelly STA":
    [points]}}, ...}, for the models torchvision's ViT can hold (the others are named and left out)."""
    test_data = fashion_mnist("test")
    n = len(test_data.dataset) if eval_images is None else eval_images
    test_x, test_y = test_data.dataset.tensors[0][:n], test_data.dataset.tensors[1][:n]
    energy_x, calib = test_data.dataset.tensors[0][:energy_images], calibration_images()
    out = {"images": n, "models": {}}
    for name in models:
        ann = create_ann(name)
        try:
            tv = to_torchvision(ann)
        except ValueError as e:
            print(f"{name}: no SpikingJelly points ({e})", flush=True)
            continue
        with torch.no_grad():
            ann_top1 = 100.0 * sum(int((ann(x).argmax(-1) == y).sum()) for x, y in
                                   zip(test_x.split(500), test_y.split(500))) / n
        points = []
        for T in steps:
            r = spikingjelly_run(tv, calib, test_x, test_y, T, energy_images=energy_x)
            points.append({"variant": PEER, "T": T, "top1": r["top1"], "ann_top1": ann_top1,
                           "energy_pj": r["energy"]["energy_pj"], "strict_pj": r["energy"]["strict_pj"],
                           "events": r["energy"]["events"],
                           "seconds": r["convert_s"] + r["evaluate_s"]})
            print(f"{name} {PEER} T={T}: {r['top1']:.2f}", flush=True)
        out["models"][name] = {PEER: points}
    return out


def _all_points(m: dict) -> List[dict]:
    """The grid's, the fine-tuned and the peer's points of one model."""
    return m["points"] + [p for part in ("finetuned", "peer") for rows in m.get(part, {}).values() for p in rows]


def _label(p: dict) -> str:
    return f"{p['variant']} T={p['T']}" + (f" after {p['epochs']} epochs" if "epochs" in p else "")


def front(points: List[dict], key: str) -> List[dict]:
    """The points no other point beats on both accuracy and ``key`` energy (strictly on one), cheapest first;
    accuracy: top-1 minus the ANN's on the same images where a point has it ('ann_top1')."""
    def score(p):
        return p["top1"] - p.get("ann_top1", 0.0)

    def beaten(p):
        return any(score(q) >= score(p) and q[key] <= p[key] and (score(q) > score(p) or q[key] < p[key])
                   for q in points)
    return sorted((p for p in points if not beaten(p)), key=lambda p: p[key])


def cheapest_within(points: List[dict], ann_top1: float, drop: float, key: str):
    ok = [p for p in points if p.get("ann_top1", ann_top1) - p["top1"] <= drop]
    return min(ok, key=lambda p: p[key]) if ok else None


def figure(res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(res["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    variants = list(dict.fromkeys(p["variant"] for m in res["models"].values() for p in m["points"]))
    for row, name in zip(axes, models):
        m = res["models"][name]

        def y(p):  # placed by its drop from the ANN on its own images
            return p["top1"] - p.get("ann_top1", m["ann_top1"]) + m["ann_top1"]
        for ax, key, title in zip(row, ("energy", "strict"), ("standard accounting", "strict accounting")):
            for i, v in enumerate(variants):
                pts = sorted((p for p in m["points"] if p["variant"] == v), key=lambda p: p["T"])
                style = "-" if v.startswith("rate") else "--"
                ax.plot([p[key] for p in pts], [y(p) for p in pts], style, marker="o", ms=3,
                        color=f"C{i % 10}", label=v)
                for p in pts:
                    ax.annotate(str(p["T"]), (p[key], y(p)), fontsize=6, xytext=(2, 2),
                                textcoords="offset points")
            for recipe, rows in m.get("finetuned", {}).items():
                variant, T = rows[0]["variant"].split(" + ")[0], rows[0]["T"]
                start = [p for p in m["points"] if p["variant"] == variant and p["T"] == T]
                pts = start + sorted(rows, key=lambda p: p["epochs"])
                colour = plt.cm.Dark2(list(FINETUNED).index(recipe) % 8) if recipe in FINETUNED else "grey"
                ax.plot([p[key] for p in pts], [y(p) for p in pts], ":", marker="*", ms=8, color=colour,
                        markevery=list(range(len(start), len(pts))), label=f"T={T} fine-tuned: {recipe}")
                for p in rows:
                    ax.annotate(f"{p['epochs']}e", (p[key], y(p)), fontsize=6, xytext=(2, -7),
                                textcoords="offset points")
            for rows in m.get("peer", {}).values():
                pts = sorted(rows, key=lambda p: p["T"])
                ax.plot([p[key] for p in pts], [y(p) for p in pts], "-.", marker="x", color="black",
                        label=f"{PEER} (peer, same weights)")
                for p in pts:
                    ax.annotate(str(p["T"]), (p[key], y(p)), fontsize=6, xytext=(2, 2), textcoords="offset points")
            edge = front(_all_points(m), key)
            ax.plot([p[key] for p in edge], [y(p) for p in edge], color="black", lw=2.5, alpha=0.25,
                    label="Pareto front")
            ax.axhline(m["ann_top1"], color="black", ls=":", lw=1, label=f"ANN {m['ann_top1']:.2f}%")
            ax.axhline(m["ann_top1"] - 0.5, color="grey", ls=":", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("energy per image / the ANN's (numbers: T)")
            ax.set_ylabel("top-1 at step T (%)")
            ax.set_title(f"{name}: {title}", fontsize=9)
            lo = sorted(p["top1"] for p in m["points"])[len(m["points"]) // 5]
            ax.set_ylim(max(lo - 3, 0), m["ann_top1"] + 1)
            ax.grid(alpha=0.3)
    for row in axes:  # each model's own fine-tuned recipes
        row[0].legend(fontsize=6, ncol=1, loc="lower right")
    fig.suptitle("Accuracy per energy (solid: rate coding, dashed: differential, stars: fine-tuned for the epochs "
                 "written beside them)", fontsize=10)
    fig.tight_layout()
    return fig


def markdown(res: dict, command: str) -> str:
    lines = [BEGIN, "## Accuracy per energy: coding x neuron x levels x T, training-free and fine-tuned, beside "
             "SpikingJelly", "",
             "Measured with " + "; ".join(f"`{c}`" for c in res.get("grid_commands", [command])) +
             f" (first on {res['date']}): {res['machine']}; top-1 at step "
             f"T on {res['images']} test images, energy on the first {res['energy_images']} ({res['data']}). Energy is the SNN's per image "
             "over T steps divided by the ANN's (DESIGN section 6, `convert/energy.py`); standard: one SOP per event, "
             "strict: a value sent with |k| > 1 costs one MAC per synapse. `events`: mean events per neuron per step. "
             "Differential coding sends k(t) - k(t-1); `s` is its hysteresis.", "",
             f"![accuracy vs energy](benchmarks/results/{'energy-quick' if res.get('quick') else 'energy'}.png)", ""]
    for name, m in res["models"].items():
        ann = m["ann_top1"]
        lines += [f"### {name} (ANN {ann:.2f}%, {m['ann_uj']:.1f} uJ per image)", ""]
        points = _all_points(m)
        for key, label in (("energy", "standard"), ("strict", "strict")):
            best = [cheapest_within(points, ann, d, key) for d in (0.5, 1.0)]
            lines.append(f"- cheapest point, {label} accounting: " + "; ".join(
                f"within {d} pt: " + (f"{_label(p)}, {p['top1']:.2f}% (drop {p.get('ann_top1', ann) - p['top1']:.2f}) "
                                      f"at {p[key]:.2f}x" if p else "none")
                for d, p in zip((0.5, 1.0), best)))
        on = {_label(p) for key in ("energy", "strict") for p in front(points, key)}
        if m.get("finetuned"):
            lines += ["", f"Fine-tuned on {m['train_images']} training images (batch 64, one cosine schedule over "
                      "the recipe's epochs, conf/finetune/bptt.yaml plus the recipe's options, lr 1e-3 unless the "
                      "recipe names another or is the defaults: lr null, set by the start agreement), measured on the "
                      f"run's way; top-1 on {m['finetuned_images']} test "
                      "images (training-free: the conversion it starts from; drop: from the ANN on the same images), "
                      "energy on the first "
                      f"{res['energy_images']}; s: cumulative fine-tuning seconds. Points measured on other test "
                      "images than the grid's are placed in the plot and the front by their drop. Measured with " +
                      "; ".join(f"`{r['command']}` ({r['date']})" for r in m["finetuned_runs"]) + ".", "",
                      "| start | T | recipe | epochs | training-free | top-1 | drop | energy (x ANN) | strict (x ANN) | "
                      "events | s | on the front |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for recipe, rows in m["finetuned"].items():
                for p in rows:
                    lines.append(f"| {p['variant'].split(' + ')[0]} | {p['T']} | {recipe} | {p['epochs']} | "
                                 f"{p['free_top1']:.2f} | {p['top1']:.2f} | {p['ann_top1'] - p['top1']:.2f} | "
                                 f"{p['energy']:.3f} | {p['strict']:.3f} | "
                                 f"{p['events']:.3f} | {p['seconds']:.0f} | {'yes' if _label(p) in on else ''} |")
        for rows in m.get("peer", {}).values():
            lines += ["", f"{PEER} on the same weights (benchmarks.peers: spiking_encoder mode, MSE thresholds, scale "
                      "0.5, the image at step 1 only, one conversion per T), top-1 on "
                      f"{m['peer_images']} test images, energy on the first {res['energy_images']} by the same rules "
                      "(`benchmarks.peers.sta_energy`): its encoders send unbounded counts, so under the strict "
                      "accounting a count above 1 is one MAC, cheaper than its standard count of SOPs from 6 up. "
                      "Its LayerNorm, GELU and whole attention (softmax, both products, the output projection) are "
                      "analog at every step. Measured with " +
                      "; ".join(f"`{r['command']}` ({r['date']})" for r in m["peer_runs"]) + ".", "",
                      "| T | top-1 | drop | energy (x ANN) | strict (x ANN) | events | on the front |",
                      "|---|---|---|---|---|---|---|"]
            for p in rows:
                lines.append(f"| {p['T']} | {p['top1']:.2f} | {p['ann_top1'] - p['top1']:.2f} | {p['energy']:.3f} | "
                             f"{p['strict']:.3f} | {p['events']:.3f} | {'yes' if _label(p) in on else ''} |")
        lines += ["", "| variant | T | top-1 | drop | energy (x ANN) | strict (x ANN) | events | on the front |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in m["points"]:
            lines.append(f"| {p['variant']} | {p['T']} | {p['top1']:.2f} | {ann - p['top1']:.2f} | {p['energy']:.3f} | "
                         f"{p['strict']:.3f} | {p['events']:.3f} | {'yes' if _label(p) in on else ''} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def merge(res: dict, part: str, new: dict, run: dict) -> None:
    """Put the points of a ``measure_finetuned`` or ``measure_peer`` result into ``res`` as ``part`` (its rows
    replace those of the same name), the peer's energy relative to the ANN's, with ``run`` (command, date)."""
    for name, rows in new["models"].items():
        m = res["models"][name]
        for p in (p for points in rows.values() for p in points if "energy_pj" in p):
            p.update(energy=p["energy_pj"] / (m["ann_uj"] * 1e6), strict=p["strict_pj"] / (m["ann_uj"] * 1e6))
        m[part] = {**m.get(part, {}), **rows}
        m.update({f"{part}_images": new["images"], **({"train_images": new["train_images"]}
                                                       if "train_images" in new else {})})
        m[f"{part}_runs"] = [r for r in m.get(f"{part}_runs", []) if r["command"] != run["command"]] + [run]


def _run(args, grid):
    saved = args.out / "energy.json"
    parts = [("finetuned", lambda: measure_finetuned(args.models, args.finetuned, args.eval_images,
                                                     args.energy_images, args.train_images))] if args.finetuned else []
    parts += [("peer", lambda: measure_peer(args.models, args.eval_images, args.energy_images))] if args.peer else []
    if parts or args.variants:  # only these parts or grid variants are measured; everything else saved stays
        res = json.loads(saved.read_text())
        res.setdefault("grid_commands", [res.pop("grid_command", res["command"])])
    else:
        old = json.loads(saved.read_text())["models"] if saved.exists() and not args.quick else {}
        res = {**measure(args.models, grid, args.eval_images, args.energy_images), "quick": args.quick,
               "grid_commands": [command_line("benchmarks.energy")]}
        for name, m in res["models"].items():  # the fine-tuned points stay
            m.update({k: v for k, v in old.get(name, {}).items() if k.startswith("finetuned") or k == "train_images"})
        parts = [("peer", lambda: measure_peer(args.models, args.eval_images, args.energy_images))]
    if args.variants:
        new = measure(args.models, {v: GRID[v] for v in args.variants}, args.eval_images, args.energy_images)
        order = list(GRID)
        for name, m in new["models"].items():
            points = [p for p in res["models"][name]["points"] if p["variant"] not in args.variants] + m["points"]
            res["models"][name]["points"] = sorted(points, key=lambda p: (order.index(p["variant"]), p["T"]))
        res["grid_commands"].append(command_line("benchmarks.energy"))
    run = {"command": command_line("benchmarks.energy"), "date": machine_info("")["date"]}
    for part, measure_part in parts:
        merge(res, part, measure_part(), run)
    return res


def save_figure(res: dict, args) -> None:
    """benchmarks/results/energy[-quick].png from the results."""
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / ("energy-quick.png" if args.quick else "energy.png"), png_bytes(figure(res), dpi=110))


def _arguments(parser):
    parser.add_argument("--models", nargs="+", default=["vit_fmnist", "vit_fmnist_gap"])
    parser.add_argument("--eval-images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--energy-images", type=int, default=64)
    parser.add_argument("--finetuned", nargs="+", default=[], choices=list(FINETUNED),
                        help="run only these fine-tuning recipes (on --models) and keep the other saved results")
    parser.add_argument("--train-images", type=int, default=None, help="fine-tuning: default the whole train split")
    parser.add_argument("--variants", nargs="+", default=[], choices=list(GRID),
                        help="run only these grid variants (on --models); their saved points are replaced")
    parser.add_argument("--peer", action="store_true",
                        help=f"run only {PEER}'s points (on --models) and keep the other saved results")


def main() -> None:
    def quick(args):
        args.models, args.eval_images = args.models[:1], args.eval_images or 500
        return _run(args, QUICK)
    benchmark_main("energy", __doc__, lambda args: _run(args, GRID), quick, markdown, _arguments, plot=save_figure)


if __name__ == "__main__":
    main()
