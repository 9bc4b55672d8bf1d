"""The main job: load the ANN and data, convert each variant, evaluate at every timestep, write the run folder.

Run folder: snn.safetensors (the first variant), sweep.csv, sweep.png, energy.png, report.json, and with
fine-tuning finetune.safetensors (the resumable training checkpoint, written while training).
All files are prepared first and then renamed into place, so a folder never holds a half-written file.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from convert.api import check_options, convert
from convert.checkpoint import load, save
from convert.config import convert_options, finetune_options, show_progress
from convert.energy import energy_report
from convert.evaluate import evaluate
from convert.finetune import check_finetune_options, finetune
from convert.network import SpikingModel, check_timesteps, input_spec
from convert.plots import energy_figure, png_bytes, sweep_figure
from convert.resources import activation_elements, check_memory
from convert.schema import keys_by_path, validate_config
from models.data import load_dataset
from models.distributed import all_gather_object, check_same, init_from_env, is_main, shard_batches
from models.zoo import create_ann, resolve_name


CHECKPOINT = "finetune.safetensors"  # the resumable fine-tuning checkpoint in the run folder
MIN_FREE_BYTES = 64 * 2 ** 20  # checked up front; the model's own size is checked once it is built


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available: use device=cpu")
    return device


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent: where a folder about to be made will take its space from."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


def output_folder(cfg: DictConfig) -> Path:
    """The run folder (created when results are written); it must be creatable before any work starts."""
    if cfg.out:
        out = Path(cfg.out).expanduser()
    else:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = Path("runs") / f"{stamp}_{cfg.model.name.replace('/', '_')}"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder: choose another --out")
    existing = _nearest_existing(out)
    try:  # a probe file: permissions, read-only mounts and pseudo file systems all answer here, not at the end
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".vit-snn-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"output folder {out} is not writable ({existing} does not accept files: "
                              f"{exc.strerror or exc}): choose another --out") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise OSError(28, f"only {free / 2 ** 20:.0f} MB free for the output folder {out} (at least "
                          f"{MIN_FREE_BYTES / 2 ** 20:.0f} MB needed): free space or choose another --out", str(out))
    return out


def sweep_rows(variant: str, result: Dict) -> List[Dict]:
    return [{"variant": variant, "t": t + 1, "top1": result["top1"][t], "top5": result["top5"][t],
             "agreement": result["agreement"][t]} for t in range(len(result["top1"]))]


def csv_bytes(rows: List[Dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def energy_steps(T: int) -> List[int]:
    """t = 1, 2, 4, ... and T itself."""
    steps = [2 ** i for i in range(T.bit_length()) if 2 ** i < T]
    return steps + [T]


def print_table(variant: str, result: Dict) -> None:
    print(f"\n[{variant}] ANN top-1 {result['ann_top1']:.2f}%  ({result['images']} images)")
    print(f"{'t':>4} {'SNN top-1':>10} {'drop':>7} {'agree':>7}")
    for t, (acc, agr) in enumerate(zip(result["top1"], result["agreement"]), 1):
        print(f"{t:>4} {acc:>9.2f}% {result['ann_top1'] - acc:>6.2f} {agr:>6.2f}%")


def write_files(out: Path, files: Dict[str, bytes], snn: Optional[SpikingModel] = None) -> None:
    """Stage every file (and ``snn.safetensors``) in a hidden folder inside ``out``, then rename each into place."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        if snn is not None:
            save(snn, staging / "snn.safetensors")
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _variant(base: Dict, overrides: Dict, T: int):
    """A sweep variant: convert() options over the configured ones, and its own T (key ``timesteps``)."""
    T_v = check_timesteps(overrides.pop("timesteps", T))
    return check_options({**base, **overrides}), T_v


def check_config(cfg: DictConfig) -> None:
    """The checks a run makes before any work (multirun makes them for every job before starting any): every
    key against the schema (convert.schema), the model name, the output folder."""
    keys_by_path()["model.name"].check(cfg.model.name)
    resolve_name(cfg.model.name)  # the model first: the data a run needs follows from it
    validate_config(cfg)
    for name, opts in (cfg.sweep.variants or {}).items():
        _variant(convert_options(cfg), dict(opts), cfg.timesteps)
    check_finetune_options(cfg.finetune.epochs, {**finetune_options(cfg), "checkpoint_path": CHECKPOINT})
    resolve_device(cfg.device)
    output_folder(cfg)


def check_resources(cfg: DictConfig, ann: torch.nn.Module, device: torch.device, T: int, out: Path) -> None:
    """Memory for simulation (and fine-tuning) and disk for the checkpoint, before any expensive work."""
    inputs = input_spec(ann)
    elements = activation_elements(ann, inputs)
    check_memory(ann, inputs, device, "simulating the SNN", cfg.data.batch_size, T, cfg.step_mode, elements=elements,
                 chunk=cfg.chunk)
    if cfg.finetune.epochs:
        check_memory(ann, inputs, device, "fine-tuning", cfg.finetune.batch_size, cfg.finetune.timesteps or T, "m",
                     training=True, grad_checkpoint=cfg.finetune.grad_checkpoint, elements=elements)
    weights = sum(t.numel() * t.element_size() for t in ann.state_dict().values())
    existing = _nearest_existing(out)
    free = shutil.disk_usage(existing).free
    if free < 3 * weights + MIN_FREE_BYTES:  # the SNN checkpoint (weights, thresholds, staging copy) and plots
        raise OSError(28, f"only {free / 2 ** 20:.0f} MB free for the output folder, the SNN checkpoint alone needs "
                          f"about {weights / 2 ** 20:.0f} MB: free space or choose another --out", str(existing))


def run(cfg: DictConfig, load_path: Optional[str] = None) -> Dict:
    """Under torchrun every rank runs this; images are sharded, rank 0 prints and writes (returns {} elsewhere)."""
    check_config(cfg)
    T = cfg.timesteps
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    world = init_from_env(device.type)
    if world > 1:
        check_same(OmegaConf.to_yaml(cfg, resolve=True) + f"load={load_path}", "config")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    say = print if is_main() else (lambda *args, **kwargs: None)
    progress = show_progress(cfg.progress) and is_main()
    out = Path(all_gather_object(str(output_folder(cfg)))[0])  # rank 0's folder (its time stamp)
    start = time.time()
    base = convert_options(cfg)
    if cfg.sweep.variants is None:
        raise ValueError("the sweep is empty (sweep.variants=null): give at least one variant, or {} for the "
                         "configured options alone")
    variants = {name: _variant(base, dict(opts), T) for name, opts in cfg.sweep.variants.items()}
    if load_path:
        loaded = load(load_path, device=str(device))
        model_name, net_for_data = loaded.architecture["name"], loaded.net
        variants = {"loaded": (loaded.options, T)}
    else:
        ann = create_ann(cfg.model.name, cfg.model.checkpoint, cfg.model.pretrained).to(device)
        model_name, net_for_data = cfg.model.name, ann
        variants = variants or {"default": (check_options(base), T)}
        check_resources(cfg, ann, device, max(t for _, t in variants.values()), out)
    test = load_dataset(cfg.data, "test", net_for_data)
    say(f"model {model_name}; data {cfg.data.name} from {test.source}" + (f"; {world} processes" if world > 1 else ""))
    if test.subset:
        say("note: Fashion-MNIST is not available here; numbers are on the bundled 1,000-image subset")
    n_eval = len(test.dataset) if cfg.data.eval_images is None else min(cfg.data.eval_images, len(test.dataset))
    if -(-n_eval // cfg.data.batch_size) < world:
        raise ValueError(f"{n_eval} evaluation images in batches of {cfg.data.batch_size} cannot be shared by {world} "
                         f"processes: use fewer processes (nproc_per_node), more images or smaller data.batch_size")
    test_loader = DataLoader(test.dataset, batch_sampler=shard_batches(n_eval, cfg.data.batch_size),
                             pin_memory=device.type == "cuda")
    energy_set = Subset(test.dataset, range(min(cfg.sweep.energy_images, n_eval)))
    energy_images = torch.stack([energy_set[i][0] for i in range(len(energy_set))])
    calib = train = None
    if not load_path or cfg.finetune.epochs:
        train = load_dataset(cfg.data, "train", net_for_data)
    if not load_path:
        gen = torch.Generator().manual_seed(cfg.seed)
        n_cal = min(cfg.calibration.num_images, len(train.dataset))  # calibrate() warns when short
        calib = DataLoader(Subset(train.dataset, torch.randperm(len(train.dataset), generator=gen)[:n_cal].tolist()),
                           batch_size=cfg.data.batch_size)

    rows, energy_points, results, first = [], [], {}, None
    for name, (opts, T_v) in variants.items():
        t0 = time.time()
        snn = loaded if load_path else convert(ann, calib, timesteps=T_v, **{**opts, "progress": progress})
        convert_s = time.time() - t0
        t0 = time.time()
        if cfg.finetune.epochs:
            out.mkdir(parents=True, exist_ok=True)
            ckpt = out / (CHECKPOINT if len(variants) == 1 else f"finetune-{name}.safetensors")
            try:
                finetune(snn, train.dataset, cfg.finetune.epochs,
                         **{**finetune_options(cfg), "progress": progress, "checkpoint_path": ckpt})
            except KeyboardInterrupt:
                if ckpt.is_file():
                    raise KeyboardInterrupt(f"fine-tuning stopped; its last checkpoint is {ckpt}: continue with the "
                                            f"same command plus finetune.resume={ckpt}") from None
                raise
            ft = snn.finetune_report
            chosen = "" if ft["start_agreement"] is None else \
                f", set by {100 * ft['start_agreement']:.0f}% top-1 agreement with the ANN at the start"
            say(f"[{name}] fine-tuned {ft['steps']} steps at T={ft['timesteps']} (lr {ft['options']['lr']:g}{chosen}) "
                f"in {ft['seconds']:.0f} s; train loss per epoch {', '.join(f'{v:.4f}' for v in ft['loss'])}")
        finetune_s = time.time() - t0
        t0 = time.time()
        result = evaluate(snn, test_loader, T_v, progress=progress, reference=None if load_path else ann)
        eval_s = time.time() - t0
        if not is_main():
            continue
        print_table(name, result)
        energies = {t: energy_report(snn, energy_images, timesteps=t) for t in energy_steps(T_v)}
        rows += sweep_rows(name, result)
        energy_points += [{"variant": name, "t": t, "top1": result["top1"][t - 1],
                           "energy_uj": e["energy_snn_pj"] / 1e6} for t, e in energies.items()]
        results[name] = {**result, "options": {k: v for k, v in opts.items() if k != "progress"},
                         "timings_s": {"convert": convert_s, "finetune": finetune_s, "evaluate": eval_s},
                         "finetune": snn.finetune_report,
                         "energy": {t: {k: v for k, v in e.items() if k != "layers"} for t, e in energies.items()},
                         "calibration": snn.calibration_report}
        first = first or snn
    if not is_main():
        return {}
    ann_top1 = next(iter(results.values()))["ann_top1"]
    ann_energy = next(iter(results.values()))["energy"][1]["energy_ann_pj"] / 1e6
    report = {"model": model_name, "data": cfg.data.name, "data_source": test.source, "subset": test.subset,
              "timesteps": T, "device": str(device), "ann_top1": ann_top1, "variants": results,
              "config": OmegaConf.to_container(cfg), "loaded_from": load_path, "torch": torch.__version__,
              "total_s": time.time() - start, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    files = {"sweep.csv": csv_bytes(rows), "report.json": json.dumps(report, indent=2).encode(),
             "sweep.png": png_bytes(sweep_figure(rows, ann_top1, f"{model_name}, T={T}")),
             "energy.png": png_bytes(energy_figure(energy_points, ann_top1, ann_energy, f"{model_name}"))}
    write_files(out, files, first)
    print(f"\nwrote {out}/: snn.safetensors, sweep.csv, sweep.png, energy.png, report.json")
    return report
