"""The main job: load the ANN and data, convert, evaluate at every timestep, write the run folder."""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from convert.api import convert
from convert.config import convert_options
from convert.evaluate import evaluate
from convert.network import check_timesteps
from models.data import load_dataset
from models.zoo import create_ann


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


def output_folder(cfg: DictConfig) -> Path:
    """The run folder (created when results are written); it must be creatable before any work starts."""
    if cfg.out:
        out = Path(cfg.out).expanduser()
    else:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = Path("runs") / f"{stamp}_{cfg.model.name.replace('/', '_')}"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder: choose another --out")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out} is not writable ({existing} does not accept files): "
                              f"choose another --out")
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sweep_rows(variant: str, result: Dict) -> list:
    return [{"variant": variant, "t": t + 1, "top1": result["top1"][t], "top5": result["top5"][t],
             "agreement": result["agreement"][t]} for t in range(len(result["top1"]))]


def csv_bytes(rows: list) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def print_table(result: Dict) -> None:
    print(f"\nANN top-1 {result['ann_top1']:.2f}%  ({result['images']} images)")
    print(f"{'t':>4} {'SNN top-1':>10} {'drop':>7} {'agree':>7}")
    for t, (acc, agr) in enumerate(zip(result["top1"], result["agreement"]), 1):
        print(f"{t:>4} {acc:>9.2f}% {result['ann_top1'] - acc:>6.2f} {agr:>6.2f}%")


def run(cfg: DictConfig) -> Dict:
    T = check_timesteps(cfg.timesteps)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = output_folder(cfg)
    start = time.time()
    ann = create_ann(cfg.model.name, cfg.model.checkpoint, cfg.model.pretrained).to(device)
    test = load_dataset(cfg.data, "test", ann)
    train = load_dataset(cfg.data, "train", ann)
    print(f"model {cfg.model.name}; data {cfg.data.name} from {test.source}")
    if test.subset:
        print("note: Fashion-MNIST is not available here; numbers are on the bundled 1,000-image subset")
    gen = torch.Generator().manual_seed(cfg.seed)
    n_cal = min(cfg.calibration.num_images, len(train.dataset))
    if n_cal < cfg.calibration.num_images:
        print(f"warning: only {n_cal} calibration images available (asked for {cfg.calibration.num_images})")
    calib = Subset(train.dataset, torch.randperm(len(train.dataset), generator=gen)[:n_cal].tolist())
    n_eval = len(test.dataset) if cfg.data.eval_images is None else min(cfg.data.eval_images, len(test.dataset))
    test_loader = DataLoader(Subset(test.dataset, range(n_eval)), batch_size=cfg.data.batch_size)
    t0 = time.time()
    snn = convert(ann, DataLoader(calib, batch_size=cfg.data.batch_size), timesteps=T, **convert_options(cfg))
    convert_s = time.time() - t0
    t0 = time.time()
    result = evaluate(ann, snn, test_loader, T, progress=cfg.progress)
    eval_s = time.time() - t0
    print_table(result)
    report = {
        "model": cfg.model.name, "data": cfg.data.name, "data_source": test.source, "subset": test.subset,
        "timesteps": T, "options": {k: v for k, v in snn.options.items() if k != "progress"},
        "config": OmegaConf.to_container(cfg), "device": str(device), **result,
        "timings_s": {"convert": convert_s, "evaluate": eval_s, "total": time.time() - start},
        "calibration": snn.calibration_report, "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.csv", csv_bytes(sweep_rows("default", result)))
    write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
    print(f"\nwrote {out}/sweep.csv and report.json")
    return report
