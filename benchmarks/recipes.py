"""What makes a short fine-tuning count at low T: 150 steps of batch 64 per recipe, on models the defaults
were not tuned on. Writes its section of BENCHMARKS.md.

    python -m benchmarks.recipes [--models vit_fmnist_gap vit_fmnist] [--steps 150] [--eval-images 2000]
                                 [--recipes NAME ...] [--timesteps 1 2 4 8]
    python -m benchmarks.recipes --quick     # vit_fmnist_gap, 10 steps, 300 test images

Each recipe converts the model at T=4 (signed IF L=1 unless it says otherwise), measures top-1 at step 4 and
the energy per image (both accountings, ``convert.energy_report`` on 64 test images) before and after
fine-tuning on the first steps x 64 training images, with conf/finetune/bptt.yaml's settings except what
the recipe changes. ``--timesteps`` other than 4 measures the recipes at each of those T instead (its own
results file and section: recipes-over-t); its rows join the saved ones measured over the same T, steps and
test images, so a recipe can be added or remeasured alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from benchmarks.core import accuracy_and_energy, calibration_images, command_line, machine_info, run_text, with_run
from benchmarks.outputs import benchmark_main
from convert import convert, finetune
from convert.finetune import default_lr, first_batches, start_agreement
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
BEGIN_OVER_T, END_OVER_T = "<!-- recipes-over-t:begin -->", "<!-- recipes-over-t:end -->"
T = 4
# name -> (convert options, finetune options); the ingredients' rows were measured at lr 1e-3 (then the default)
RECIPES = {
    "labels (defaults)": ({}, {}),
    "labels, lr 1e-3": ({}, dict(lr=1e-3)),
    "labels, lr 3e-4": ({}, dict(lr=3e-4)),
    "labels, lr 1e-4": ({}, dict(lr=1e-4)),
    "labels, thresholds only": ({}, dict(weights=False, lr=1e-2)),
    "distill 0.5": ({}, dict(distill=0.5, lr=1e-3)),
    "distill 1 (no labels)": ({}, dict(distill=1.0, lr=1e-3)),
    "distill 0.5, event penalty 100": ({}, dict(distill=0.5, event_penalty=100.0, lr=1e-3)),
    "differential L=2, distill 0.5": (dict(coding="differential", levels=2), dict(distill=0.5, lr=1e-3)),
}


def measure(models, recipes, steps: int, eval_images: int, timesteps: int = T) -> dict:
    test_data = fashion_mnist("test")
    train = fashion_mnist("train").dataset
    test = Subset(test_data.dataset, range(eval_images))
    loader = DataLoader(test, batch_size=250)
    energy_x = test_data.dataset.tensors[0][:64]
    calib = calibration_images()
    images = train.tensors[0][:steps * 64], train.tensors[1][:steps * 64]
    out = {**machine_info(test_data.source), "images": eval_images, "steps": steps, "models": {}}
    for name in models:
        ann = create_ann(name)
        rows = {}
        for recipe, (options, ft_options) in recipes.items():
            snn = convert(ann, calib, timesteps=timesteps, progress=False, **options)
            before = accuracy_and_energy(snn, loader, timesteps, energy_x)
            t0 = time.time()
            finetune(snn, images, epochs=1, batch_size=64, progress=False, **ft_options)
            seconds = time.time() - t0
            rows[recipe] = {"before": before, "after": accuracy_and_energy(snn, loader, timesteps, energy_x),
                            "seconds": seconds}
            print(f"{name} T={timesteps} {recipe}: {before['top1']:.2f} -> {rows[recipe]['after']['top1']:.2f} "
                  f"(ANN {before['ann_top1']:.2f}), energy {before['energy']:.3f} -> {rows[recipe]['after']['energy']:.3f}",
                  flush=True)
        # where the default learning rate (lr None) would start this model at this T
        agreement = start_agreement(convert(ann, calib, timesteps=timesteps, progress=False), first_batches(images),
                                    timesteps, seed=0)
        out["models"][name] = {"ann_top1": next(iter(rows.values()))["before"]["ann_top1"], "recipes": rows,
                               "start_agreement": agreement}
    return out


def measure_over_t(models, recipes, steps: int, eval_images: int, timesteps) -> dict:
    """``measure`` at each T: per model, recipe -> {T: row}."""
    runs = {t: measure(models, recipes, steps, eval_images, t) for t in timesteps}
    out = {**next(iter(runs.values())), "timesteps": list(timesteps), "models": {}}
    for name in models:
        out["models"][name] = {"ann_top1": runs[timesteps[0]]["models"][name]["ann_top1"],
                               "recipes": {r: {str(t): runs[t]["models"][name]["recipes"][r] for t in timesteps}
                                           for r in recipes},
                               "start_agreement": {str(t): runs[t]["models"][name]["start_agreement"]
                                                   for t in timesteps}}
    return out


def saved_over_t(path: Path, timesteps, steps: int, images: int) -> dict | None:
    """The saved run over T at ``path``, None if there is none. A run over other T, steps or test images
    would replace its rows, so it is refused before anything is measured."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if [old["timesteps"], old["steps"], old["images"]] != [list(timesteps), steps, images]:
        raise SystemExit(f"{path} holds rows over T={old['timesteps']}, {old['steps']} steps, {old['images']} test "
                         f"images, which this run (T={list(timesteps)}, {steps} steps, {images} test images) would "
                         f"replace: pass --out DIR to keep them apart, or delete the file to start afresh")
    return old


def joined(res: dict, old: dict | None) -> dict:
    """``res`` (a ``measure_over_t`` result) with the rows of ``old`` (the saved run) kept where ``res`` has no
    recipe of that name (the start agreements are ``res``'s); ``runs`` lists each command with its date."""
    run = {"command": command_line("benchmarks.recipes"), "date": res["date"]}
    if old is None:
        return {**res, "runs": [run]}
    runs = with_run(old.get("runs", [{"command": old["command"], "date": old["date"]}]), run)
    models = old["models"]
    for name, m in res["models"].items():
        recipes = {**models.get(name, {}).get("recipes", {}), **m["recipes"]}
        models[name] = {**m, "recipes": dict(sorted(recipes.items(), key=lambda r: list(RECIPES).index(r[0])))}
    return {**res, "models": models, "runs": runs}


def markdown(res: dict, command: str) -> str:
    if "timesteps" in res:
        return markdown_over_t(res, command)
    lines = [BEGIN, f"## Fine-tuning recipes at T={T}: what {res['steps']} steps of batch 64 buy", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; top-1 at step {T} on {res['images']} test "
             f"images; energy per image / the ANN's on 64 of them (standard / strict). Every recipe starts from the "
             f"same training-free conversion (its own coding and alphabet) and trains on the same "
             f"{res['steps'] * 64} training images, conf/finetune/bptt.yaml's settings otherwise (lr 1e-3 unless "
             f"named, but for the defaults' row).", ""]
    for name, m in res["models"].items():
        lines += [f"### {name} (ANN {m['ann_top1']:.2f}%)", "",
                  "| recipe | training-free | fine-tuned | gain | drop vs ANN | energy before -> after | strict after | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for recipe, r in m["recipes"].items():
            b, a = r["before"], r["after"]
            lines.append(f"| {recipe} | {b['top1']:.2f} | {a['top1']:.2f} | {a['top1'] - b['top1']:+.2f} | "
                         f"{m['ann_top1'] - a['top1']:.2f} | {b['energy']:.3f} -> {a['energy']:.3f} | {a['strict']:.3f} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def markdown_over_t(res: dict, command: str) -> str:
    ts = res["timesteps"]
    runs = " and ".join(map(run_text, res.get("runs", [{"command": command, "date": res["date"]}])))
    lines = [BEGIN_OVER_T, f"## Fine-tuning recipes at T={', '.join(map(str, ts))}: what {res['steps']} steps of "
             f"batch 64 buy", "",
             f"Measured with {runs}: {res['machine']}; top-1 at step T on {res['images']} test "
             f"images, before -> after fine-tuning (gain), each recipe from the training-free conversion at that T, "
             f"on the same {res['steps'] * 64} training images, conf/finetune/bptt.yaml's settings otherwise. "
             f"Bold: the largest gain at that T. Last row: the SNN's top-1 agreement with the ANN on the first "
             f"256 training images, and the rate the default (finetune.lr=null) takes from it (5e-3 x the "
             f"disagreement, within [1e-4, 1e-3]).", ""]
    for name, m in res["models"].items():
        best = {t: max(r[t]["after"]["top1"] - r[t]["before"]["top1"] for r in m["recipes"].values())
                for t in map(str, ts)}
        lines += [f"### {name} (ANN {m['ann_top1']:.2f}%)", "",
                  "| recipe | " + " | ".join(f"T={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
        for recipe, by_t in m["recipes"].items():
            cells = []
            for t in map(str, ts):
                b, a = by_t[t]["before"]["top1"], by_t[t]["after"]["top1"]
                gain = f"{a - b:+.2f}"
                cells.append(f"{b:.2f} -> {a:.2f} ({f'**{gain}**' if a - b == best[t] else gain})")
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        if "start_agreement" in m:
            picks = [(a, default_lr(a)) for a in map(m["start_agreement"].get, map(str, ts))]
            lines.append("| default (lr null): agreement -> lr | " + " | ".join(f"{100 * a:.1f}% -> {lr:.1e}"
                                                                              for a, lr in picks) + " |")
        lines.append("")
    lines.append(END_OVER_T)
    return "\n".join(lines) + "\n"


def _arguments(parser):
    parser.add_argument("--models", nargs="+", default=["vit_fmnist_gap", "vit_fmnist"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--timesteps", nargs="+", type=int, default=[T])


def _over_t(args) -> bool:
    return list(args.timesteps) != [T]


def main() -> None:
    def full(args):
        recipes = {r: RECIPES[r] for r in args.recipes}
        if _over_t(args):
            old = saved_over_t(args.out / "recipes-over-t.json", args.timesteps, args.steps, args.eval_images)
            return joined(measure_over_t(args.models, recipes, args.steps, args.eval_images, args.timesteps), old)
        return measure(args.models, recipes, args.steps, args.eval_images)

    def quick(args):
        return measure(args.models[:1], dict(list(RECIPES.items())[:2]), 10, 300)
    benchmark_main("recipes", __doc__, full, quick, markdown, _arguments,
                   variant=lambda args: "-over-t" if _over_t(args) else "")


if __name__ == "__main__":
    main()
