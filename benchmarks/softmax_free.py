"""From a pretrained softmax ViT to the softmax-free variants: accuracy vs fine-tuning epochs at T=4.
Writes its section of BENCHMARKS.md.

    python -m benchmarks.softmax_free [--epochs 3] [--ablation-steps 150] [--variants ssa a2os2a spike_driven]
                                      [--ingredients "constant norm" ...]
    python -m benchmarks.softmax_free --quick     # minutes: ssa, a few steps, 300 test images

Each variant is converted from vit_fmnist at T=4 (signed IF L=1 elsewhere; calibration fits the
softmax-free attention's output map, calibration.corrections.output_affine) and fine-tuned with
conf/finetune/bptt.yaml's settings.
- Ablation: each ingredient (labels, distillation, block-output distillation, the ANN-to-SNN blend, the
  constant-statistics norm) for ``--ablation-steps`` steps of batch 64, top-1 on ``--ablation-images``
  test images (benchmarks.recipes.measure); ``--ingredients`` runs some of them, the others' saved
  rows stay.
- Epochs: one run of ``--epochs`` epochs of the training split with ``RECIPE`` (plus ``--recipe``); top-1 at
  step 4 on the test split, energy per image (standard / strict, vs the ANN) and the analog share after 0, 0.25, 0.5,
  1, 2 and 3 epochs (the run stops there and resumes from its checkpoint: the same weights as one run).
- What stays analog: training-free energy and analog share of every variant at T=4 and 16, split into the
  image layer, the norms and the rest (every run).
A part run with 0 (``--epochs 0`` or ``--ablation-steps 0``) keeps the saved results of that part.
"""
from __future__ import annotations

import json

from torch.utils.data import DataLoader, Subset

from benchmarks.core import calibration_images, command_line, finetune_curve, machine_info
from benchmarks.outputs import benchmark_main
from benchmarks.recipes import measure
from convert import convert, energy_report
from convert.energy import LAYERS
from convert.rewrite import TOKEN_NORMS
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- softmax_free:begin -->", "<!-- softmax_free:end -->"
T = 4
MODEL = "vit_fmnist"
VARIANTS = {"ssa": dict(attention="ssa"), "a2os2a": dict(attention="a2os2a"),
            "spike_driven": dict(residual="spike_driven"), "ecm (default)": {},
            "ssa, constant norm": dict(attention="ssa", norm="constant"),
            "spike_driven, constant norm": dict(residual="spike_driven", norm="constant"),
            # no softmax, no LayerNorm, a binary input to every Linear layer
            "ssa, spike_driven, constant norm": dict(attention="ssa", residual="spike_driven", norm="constant"),
            # before calibration.input_offsets: binary inputs clipped at 0
            "spike_driven, input_offsets=false": dict(residual="spike_driven", input_offsets=False),
            "spike_driven, constant norm, input_offsets=false": dict(residual="spike_driven", norm="constant",
                                                                      input_offsets=False)}
# on top of conf/finetune/bptt.yaml: labels at lr 1e-3 (the default when these runs were made; lr null picks it
# for these variants too, which start far from the ANN), since no ingredient won the ablation
RECIPE: dict = dict(lr=1e-3)
POINTS = (0.25, 0.5, 1, 2, 3)
# ingredient: (conversion options on top of the variant's, fine-tuning options)
ABLATION = {"labels": ({}, {}), "distill 0.5": ({}, dict(distill=0.5)),
            "distill 0.5 + block outputs 1": ({}, dict(distill=0.5, feature_distill=1.0)),
            "labels + blend 0.25": ({}, dict(blend=0.25)), "labels, lr 3e-4": ({}, dict(lr=3e-4)),
            "constant norm": (dict(norm="constant"), {}),
            "constant norm + blend 0.25": (dict(norm="constant"), dict(blend=0.25))}


def ablation(variants, steps: int, eval_images: int, ingredients=None) -> dict:
    out = {"steps": steps, "images": eval_images, "variants": {}}
    for name in variants:
        recipes = {i: ({**VARIANTS[name], **ABLATION[i][0]}, {**RECIPE, **ABLATION[i][1]})
                   for i in ingredients or ABLATION}
        out["variants"][name] = measure([MODEL], recipes, steps, eval_images)["models"][MODEL]["recipes"]
    return out


def analog_shares(variants, timesteps=(4, 16)) -> dict:
    """Training-free energy per image / the ANN's and what stays analog, on 64 test images: the layer fed the
    image, the norms (LayerNorm in expectation) and the rest (GELU, softmax, product rescaling, output maps)."""
    ann, calib = create_ann(MODEL), calibration_images()
    x = fashion_mnist("test").dataset.tensors[0][:64]
    out = {"images": len(x), "variants": {}}
    for name in variants:
        rows = {}
        for t in timesteps:
            snn = convert(ann, calib, timesteps=t, progress=False, **VARIANTS[name])
            r = energy_report(snn, x)
            parts = {"image layer": 0.0, "norms": 0.0, "other": 0.0}
            for op in r["analog_ops"]:
                m = snn.net.get_submodule(op["module"])
                part = "image layer" if isinstance(m, LAYERS) else \
                    "norms" if isinstance(getattr(m, "fn", None), TOKEN_NORMS) else "other"
                parts[part] += op["energy_share"]
            rows[str(t)] = {"energy": r["energy_snn_pj"] / r["energy_ann_pj"], "analog_share": r["analog_share"],
                            **parts}
        out["variants"][name] = rows
    return out


def epochs_run(variants, epochs: int, eval_images: int, train_images=None, points=POINTS, recipe=None) -> dict:
    """``recipe``: fine-tuning options on top of ``RECIPE``; the results are then named after them as well."""
    extra = recipe or {}
    recipe = {**RECIPE, **extra}
    test_data = fashion_mnist("test")
    train = fashion_mnist("train").dataset
    if train_images:
        train = Subset(train, range(train_images))
    loader = DataLoader(Subset(test_data.dataset, range(min(eval_images, len(test_data.dataset)))), batch_size=250)
    energy_x = test_data.dataset.tensors[0][:64]
    calib = calibration_images()
    ann = create_ann(MODEL)
    steps_per_epoch = -(-len(train) // 64)
    out = {"images": len(loader.dataset), "epochs": epochs, "recipe": RECIPE, "steps_per_epoch": steps_per_epoch,
           "variants": {}}
    for name in variants:
        options = VARIANTS[name]
        rows = finetune_curve(ann, calib, options, T, recipe, epochs, points, loader, train, energy_x, label=name)
        key = f"{name} + " + ", ".join(f"{k} {v}" for k, v in extra.items()) if extra else name
        out["variants"][key] = {"options": options, "recipe": recipe, "ann_top1": rows[0]["ann_top1"],
                                "points": {str(k): v for k, v in rows.items()}}
    return out


def markdown(res: dict, command: str) -> str:
    lines = [BEGIN, f"## Softmax-free variants from the pretrained {res['model']} at T={T}", "",
             f"Last run: `{command}` on {res['date']}: {res['machine']}.", ""]
    if res.get("ablation"):
        a = res["ablation"]
        lines += [f"### What each ingredient buys: {a['steps']} steps of batch 64, top-1 on {a['images']} test images",
                  "", f"Measured with {_commands(a, command)}; each recipe on top of conf/finetune/bptt.yaml and "
                  f"{', '.join(f'{k}={v}' for k, v in RECIPE.items())}.", "", "| variant | recipe | training-free | fine-tuned | drop vs ANN | s |", "|---|---|---|---|---|---|"]
        for name, rows in a["variants"].items():
            for recipe, r in rows.items():
                lines.append(f"| {name} | {recipe} | {r['before']['top1']:.2f} | {r['after']['top1']:.2f} | "
                             f"{r['before']['ann_top1'] - r['after']['top1']:.2f} | {r['seconds']:.0f} |")
        lines.append("")
    if res.get("shares"):
        lines += ["### What stays analog, training-free", "",
                  f"Energy per image / the ANN's on {res['shares']['images']} test images and the analog share of "
                  f"the SNN's energy, split into the layer fed the image, the norms and the rest (GELU, softmax, "
                  f"product rescaling, output maps). norm=constant leaves no norm analog (its per-channel map folds "
                  f"into the neuron that reads it).", "",
                  "| variant | T | energy | analog share | image layer | norms | other |", "|---|---|---|---|---|---|---|"]
        for name, rows in res["shares"]["variants"].items():
            for t, r in rows.items():
                lines.append(f"| {name} | {t} | {r['energy']:.3f} | {100 * r['analog_share']:.1f}% | "
                             f"{100 * r['image layer']:.1f}% | {100 * r['norms']:.1f}% | {100 * r['other']:.1f}% |")
        lines.append("")
    if res.get("epochs"):
        lines += _epochs_markdown(res["epochs"])
    lines.append(END)
    return "\n".join(lines) + "\n"


def _commands(part: dict, default: str) -> str:
    """The commands whose rows a part holds (each run replaces its own variants and rows)."""
    return "; ".join(f"`{c}`" for c in part.get("commands", [part.get("command", default)]))


def _epochs_markdown(res: dict) -> list:
    recipe = ", ".join(f"{k}={v}" for k, v in res["recipe"].items()) or "nothing changed"
    lines = ["### Accuracy vs fine-tuning epochs", "",
             f"Top-1 at step {T} on {res['images']} test images; energy per image / the ANN's on 64 of them (standard "
             f"/ strict); analog share of the SNN's energy. One fine-tuning run per variant, as many epochs as its "
             f"table's last row ({res['steps_per_epoch']} steps of batch 64 per epoch, one cosine schedule over all "
             f"of them; conf/finetune/bptt.yaml, {recipe}; a name with '+' says what its run changed), measured on "
             f"its way; s: its cumulative seconds. Measured with {_commands(res, 'python -m benchmarks.softmax_free')}.", ""]
    for name, v in res["variants"].items():
        lines += [f"### {name} (ANN {v['ann_top1']:.2f}%)", ""]
        lines += [f"Rows from the {v['source']}.", ""] if "source" in v else []
        lines += ["| epochs | top-1 | drop vs ANN | energy | strict | analog share | s |", "|---|---|---|---|---|---|---|"]
        for point, r in v["points"].items():
            share = f"{100 * r['analog_share']:.1f}%" if "analog_share" in r else "-"  # rows from a run's log
            lines.append(f"| {point} | {r['top1']:.2f} | {v['ann_top1'] - r['top1']:.2f} | {r['energy']:.3f} | "
                         f"{r['strict']:.3f} | {share} | {r['seconds']:.0f} |")
        lines.append("")
    return lines


def _arguments(parser):
    parser.add_argument("--variants", nargs="+", default=["ssa", "a2os2a", "spike_driven"], choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--ablation-steps", type=int, default=150)
    parser.add_argument("--ablation-images", type=int, default=2000)
    parser.add_argument("--ingredients", nargs="+", default=list(ABLATION), choices=list(ABLATION))
    parser.add_argument("--recipe", nargs="+", default=[], metavar="KEY=VALUE",
                        help="fine-tuning options of the epochs run on top of RECIPE, e.g. blend=0.25")


def _recipe(pairs):
    """KEY=VALUE pairs as fine-tuning options (values read as JSON: numbers, true / false), None if empty."""
    if not pairs:
        return None
    recipe = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            recipe[key] = json.loads(value)
        except json.JSONDecodeError:
            recipe[key] = value
    return recipe


def main() -> None:
    def full(args):
        saved = args.out / "softmax_free.json"
        res = json.loads(saved.read_text()) if saved.exists() else {}
        res.update({**machine_info(fashion_mnist("test").source), "model": MODEL, "shares": analog_shares(VARIANTS)})
        for part, run in (("ablation", args.ablation_steps and (lambda: ablation(args.variants, args.ablation_steps,
                                                                               args.ablation_images,
                                                                               args.ingredients))),
                          ("epochs", args.epochs and (lambda: epochs_run(args.variants, args.epochs, args.eval_images,
                                                                           recipe=_recipe(args.recipe))))):
            if run:  # the variants (and ablation rows) run replace theirs in the saved results; the others stay
                new = {**run(), "command": command_line("benchmarks.softmax_free")}
                old = res.get(part, {}).get("variants", {})
                if part == "ablation":
                    new["variants"] = {n: {**old.get(n, {}), **rows} for n, rows in new["variants"].items()}
                commands = [c for c in res.get(part, {}).get("commands", []) if c != new["command"]]
                res[part] = {**new, "variants": {**old, **new["variants"]}, "commands": commands + [new["command"]]}
        return res

    def quick(args):
        return {**machine_info(fashion_mnist("test").source), "model": MODEL,
                "ablation": ablation(["ssa"], 3, 300), "shares": analog_shares(["ssa, constant norm"], (4,)),
                "epochs": epochs_run(["ssa"], 1, 300, train_images=640, points=(0.5, 1))}
    benchmark_main("softmax_free", __doc__, full, quick, markdown, _arguments)


if __name__ == "__main__":
    main()
