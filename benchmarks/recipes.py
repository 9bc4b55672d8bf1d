"""What makes a short fine-tuning count at low T: 150 steps of batch 64 per recipe, on models the defaults
were not tuned on. Writes its section of BENCHMARKS.md.

    python -m benchmarks.recipes [--models vit_fmnist_gap vit_fmnist] [--steps 150] [--eval-images 2000]
    python -m benchmarks.recipes --quick     # vit_fmnist_gap, 10 steps, 300 test images

Each recipe converts the model at T=4 (signed IF L=1 unless it says otherwise), measures top-1 at step 4 and
the energy per image (both accountings, ``convert.energy_report`` on 64 test images) before and after
fine-tuning on the first steps x 64 training images, with conf/finetune/bptt.yaml's settings except what
the recipe changes.
"""
from __future__ import annotations

import time

from torch.utils.data import DataLoader, Subset

from benchmarks.core import accuracy_and_energy, calibration_images, machine_info
from benchmarks.outputs import benchmark_main
from convert import convert, finetune
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
T = 4
# name -> (convert options, finetune options)
RECIPES = {
    "labels (defaults)": ({}, {}),
    "labels, lr 3e-4": ({}, dict(lr=3e-4)),
    "labels, thresholds only": ({}, dict(weights=False, lr=1e-2)),
    "distill 0.5": ({}, dict(distill=0.5)),
    "distill 1 (no labels)": ({}, dict(distill=1.0)),
    "distill 0.5, event penalty 100": ({}, dict(distill=0.5, event_penalty=100.0)),
    "differential L=2, distill 0.5": (dict(coding="differential", levels=2), dict(distill=0.5)),
}


def measure(models, recipes, steps: int, eval_images: int) -> dict:
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
            snn = convert(ann, calib, timesteps=T, progress=False, **options)
            before = accuracy_and_energy(snn, loader, T, energy_x)
            t0 = time.time()
            finetune(snn, images, epochs=1, batch_size=64, progress=False, **ft_options)
            seconds = time.time() - t0
            rows[recipe] = {"before": before, "after": accuracy_and_energy(snn, loader, T, energy_x), "seconds": seconds}
            print(f"{name} {recipe}: {before['top1']:.2f} -> {rows[recipe]['after']['top1']:.2f} "
                  f"(ANN {before['ann_top1']:.2f}), energy {before['energy']:.3f} -> {rows[recipe]['after']['energy']:.3f}",
                  flush=True)
        out["models"][name] = {"ann_top1": next(iter(rows.values()))["before"]["ann_top1"], "recipes": rows}
    return out


def markdown(res: dict, command: str) -> str:
    lines = [BEGIN, f"## Fine-tuning recipes at T={T}: what {res['steps']} steps of batch 64 buy", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; top-1 at step {T} on {res['images']} test "
             f"images; energy per image / the ANN's on 64 of them (standard / strict). Every recipe starts from the "
             f"same training-free conversion (its own coding and alphabet) and trains on the same "
             f"{res['steps'] * 64} training images, conf/finetune/bptt.yaml's settings otherwise.", ""]
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


def _arguments(parser):
    parser.add_argument("--models", nargs="+", default=["vit_fmnist_gap", "vit_fmnist"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-images", type=int, default=2000)


def main() -> None:
    def full(args):
        return measure(args.models, RECIPES, args.steps, args.eval_images)

    def quick(args):
        return measure(args.models[:1], dict(list(RECIPES.items())[:2]), 10, 300)
    benchmark_main("recipes", __doc__, full, quick, markdown, _arguments)


if __name__ == "__main__":
    main()
