"""Conversion-core benchmark on vit_fmnist (issue: conversion core).

    python -m benchmarks.core [--eval-images N] [--max-t 32] [--levels 1 4] [--out benchmarks/results]

Fidelity: ANN accuracy, SNN accuracy and agreement with the ANN at t = 1..max_t
(one anytime run per configuration), calibration from the training split.
Speed: SNN time per timestep relative to one ANN forward at batch 64, step and
multi-step mode, measured in the same process. Memory: peak resident memory of
a fresh process simulating T steps, per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Subset

from convert import convert, energy_report, finetune
from convert.api import DEFAULTS, check_options
from convert.evaluate import evaluate
from models.data import fashion_mnist
from models.files import replacing
from models.zoo import create_ann


def write_whole(path: Path, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` through a temporary name and a rename: a reader (or a later run
    that merges into the file) finds the whole new file or the old one, never half of it."""
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def calibration_images(n: int = 512, seed: int = 0) -> torch.Tensor:
    train = fashion_mnist("train").dataset
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train.tensors[0][idx]


def parse_options(items) -> dict:
    """convert() options from ``KEY=VALUE`` strings (YAML values), checked by the schema; ValueError otherwise."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"--option {item!r}: give KEY=VALUE with KEY one of convert()'s options "
                             f"({', '.join(DEFAULTS)})")
        options[key] = yaml.safe_load(value)
    check_options(options)
    return options


def command_line(module: str, skip=()) -> str:
    """This process's command line as ``python -m module ...``, quoted so that it can be pasted into a shell."""
    return shlex.join(["python", "-m", module, *(a for a in sys.argv[1:] if a not in skip)])


def with_run(runs: list, run: dict) -> list:
    """A results file's ``runs`` (dicts with a 'command') with ``run`` last, in place of an earlier run of the same
    command."""
    return [r for r in runs if r["command"] != run["command"]] + [run]


def run_text(run: dict) -> str:
    return f"`{run['command']}` on {run['date']}"


def machine_info(data_source: str) -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads)",
            "date": str(date.today()), "data": data_source}


def fidelity(ann, calib, test, max_t, levels, target_t=None, **options):
    """One anytime run to ``max_t``; the calibration targets ``target_t`` (default max_t)."""
    loader = DataLoader(test, batch_size=256)
    t0 = time.time()
    snn = convert(ann, calib, timesteps=target_t or max_t, levels=levels, progress=False, **options)
    cal_s = time.time() - t0
    t0 = time.time()
    res = evaluate(snn, loader, max_t, progress=False)
    res["evaluate_s"] = time.time() - t0
    res["calibration_s"] = cal_s
    return res


def accuracy_and_energy(snn, loader, T: int, energy_images: torch.Tensor) -> dict:
    """Top-1 at step T on ``loader`` and the energy per image relative to the ANN's on ``energy_images``
    (standard and strict accounting, mean events per neuron per step, analog share)."""
    r = evaluate(snn, loader, T, progress=False)
    e = energy_report(snn, energy_images, timesteps=T)
    rates = list(e["firing_rates"].values())
    return {"top1": r["top1"][-1], "ann_top1": r["ann_top1"], "energy": e["energy_snn_pj"] / e["energy_ann_pj"],
            "strict": e["energy_snn_strict_pj"] / e["energy_ann_pj"], "events": sum(rates) / len(rates),
            "analog_share": e["analog_share"], "ann_uj": e["energy_ann_pj"] / 1e6}


def finetune_curve(ann, calib, options: dict, T: int, recipe: dict, epochs: int, points, loader, train,
                   energy_images: torch.Tensor, label: str = "") -> dict:
    """``accuracy_and_energy`` of the conversion at T with ``options``, training-free (key 0) and after each of
    ``points`` epochs of one fine-tuning run of ``epochs`` epochs on ``train`` (batch 64, one schedule; the run
    stops at each point and resumes from its checkpoint: the same weights as one run); 'seconds': cumulative
    fine-tuning time. ``recipe``: fine-tuning options on top of conf/finetune/bptt.yaml."""
    snn = convert(ann, calib, timesteps=T, progress=False, **options)
    rows = {0: {**accuracy_and_energy(snn, loader, T, energy_images), "seconds": 0.0}}
    print(f"{label} 0 epochs: {rows[0]['top1']:.2f}", flush=True)
    steps_per_epoch, seconds = -(-len(train) // 64), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ft.safetensors"
        for point in [p for p in points if p <= epochs]:
            resume = ckpt if ckpt.exists() else None
            snn = convert(ann, calib, timesteps=T, progress=False, **options)  # the teacher is the ANN
            t0 = time.time()
            finetune(snn, train, epochs=epochs, batch_size=64, max_steps=max(1, round(point * steps_per_epoch)),
                     resume=resume, checkpoint_path=ckpt, progress=False, **recipe)
            seconds += time.time() - t0
            rows[point] = {**accuracy_and_energy(snn, loader, T, energy_images), "seconds": seconds}
            r = rows[point]
            print(f"{label} {point} epochs: {r['top1']:.2f}, energy {r['energy']:.3f}x (strict {r['strict']:.3f}x), "
                  f"{seconds:.0f} s", flush=True)
    return rows


def timing(ann, x, T: int = 8, repeats: int = 3):
    """Seconds of one ANN forward and of one SNN timestep (step and multi-step) on batch ``x``."""
    calib = x
    out = {}
    with torch.no_grad():
        ann(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            ann(x)
        out["ann_forward_s"] = (time.perf_counter() - t0) / repeats
    for mode in ("s", "m"):
        snn = convert(ann, calib, timesteps=T, step_mode=mode, progress=False)
        snn.simulate(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            snn.simulate(x)
        out[f"snn_step_s_{mode}"] = (time.perf_counter() - t0) / repeats / T
    return out


def peak_memory_mb(mode: str, T: int, batch: int = 64) -> float:
    """Peak resident memory increase (MB, Linux VmHWM) of a fresh process simulating T steps of a batch.

    Small images and calibration on 2 of them, so that nothing before the simulation sets the peak; VmHWM
    (unlike ru_maxrss) starts afresh in the new process image."""
    code = (
        "import re, torch; from convert import convert; from models.zoo import create_ann;"
        "from models.data import load_bundled_fmnist;"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
        f"ann = create_ann('vit_fmnist'); x = load_bundled_fmnist('test').tensors[0][:{batch}];"
        f"snn = convert(ann, x[:2], timesteps={T}, step_mode='{mode}', progress=False);"
        "base = hwm(); snn.simulate(x);"
        "print((hwm() - base) / 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--max-t", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--memory-t", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    ann = create_ann("vit_fmnist")
    test_data = fashion_mnist("test")
    test = test_data.dataset if args.eval_images is None else Subset(test_data.dataset, range(args.eval_images))
    calib = calibration_images()
    results = {**machine_info(test_data.source), "command": command_line("benchmarks.core"),
               "fidelity": {}}
    for levels in args.levels:
        results["fidelity"][f"L={levels}"] = fidelity(ann, calib, test, args.max_t, levels)
        print(f"L={levels}: ANN {results['fidelity'][f'L={levels}']['ann_top1']:.2f}%", flush=True)
    results["timing_batch64"] = timing(ann, calib[:64])
    results["peak_memory_mb"] = {m: {T: peak_memory_mb(m, T) for T in args.memory_t} for m in ("s", "m")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / "core.json", json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "fidelity"}, indent=2))
    for name, res in results["fidelity"].items():
        print(name, "ANN", round(res["ann_top1"], 2),
              {t: (round(res["top1"][t - 1], 2), round(res["agreement"][t - 1], 2))
               for t in (1, 2, 4, 8, 16, 32) if t <= args.max_t})


if __name__ == "__main__":
    main()
