"""Calibration benchmark on vit_fmnist: accuracy at T = 1, 2, 4, 8, 16 per threshold method and correction.

    python -m benchmarks.calibration [--eval-images N] [--out benchmarks/results]

Methods that do not depend on T (max, percentiles) are one anytime run each; the
T-specific ones (mse, bias correction) are calibrated for the issue's target T
(T=8 for L=1, T=4 for L=4) and evaluated at every t as well.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import Subset

from benchmarks.core import calibration_images, command_line, fidelity, machine_info, write_whole
from models.data import fashion_mnist
from models.zoo import create_ann

T_MAX = 16
TARGET_T = {1: 8, 4: 4}
LAYER, CHANNEL = dict(per_channel=False), dict(per_channel=True)
METHODS = {
    "max": dict(calibration="max", **LAYER),
    "p99.9": dict(calibration="percentile", percentile=99.9, **LAYER),
    "p99.99": dict(calibration="percentile", percentile=99.99, **LAYER),
    "mse": dict(calibration="mse", **LAYER),
    "p99 per-channel": dict(calibration="percentile", percentile=99.0, **CHANNEL),
    "p99.5 per-channel": dict(calibration="percentile", percentile=99.5, **CHANNEL),
    "p99.9 per-channel": dict(calibration="percentile", percentile=99.9, **CHANNEL),
    "mse per-channel": dict(calibration="mse", **CHANNEL),
    "p99.5 per-channel+bias": dict(calibration="percentile", percentile=99.5, correction="bias", **CHANNEL),
}
# L=4: the per-layer baseline and the per-channel settings
METHODS_L4 = ("p99.9", "p99.5 per-channel", "mse per-channel", "p99.5 per-channel+bias")


def run(eval_images=None, levels=(1, 4), methods=METHODS):
    ann = create_ann("vit_fmnist")
    data = fashion_mnist("test")
    test = data.dataset if eval_images is None else Subset(data.dataset, range(eval_images))
    calib = calibration_images()
    table = {}
    for L in levels:
        for name, opts in methods.items():
            if L > 1 and name not in METHODS_L4:
                continue
            T = TARGET_T[L] if ("mse" in name or "bias" in name) else T_MAX
            res = fidelity(ann, calib, test, max(T, T_MAX), L, target_t=T, **opts)
            table[f"L={L} {name}"] = {"target_t": T, **res}
            print(f"L={L} {name:<12} ANN {res['ann_top1']:.2f}  " + "  ".join(
                f"T{t}:{res['top1'][t - 1]:.2f}" for t in (1, 2, 4, 8, 16)) + f"  cal {res['calibration_s']:.1f}s",
                flush=True)
    return {**machine_info(data.source), "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = run(args.eval_images)
    results["command"] = command_line("benchmarks.calibration")
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / "calibration.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
