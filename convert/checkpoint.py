"""SNN checkpoints: safetensors tensors plus the full conversion config as metadata (never a pickle).

Metadata: ``format`` ("vit-snn"), ``version``, and ``config`` (JSON): the ANN's timm
architecture (name and keyword arguments), the conversion options, T, step mode,
the calibration report, and the package, timm and torch versions. ``load`` rebuilds
the spiking network from the architecture alone: no ANN weights file is needed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "vit-snn"
VERSION = 1
PACKAGE_VERSION = "0.1.0"


def save(snn, path) -> Path:
    """Write ``snn`` to ``path`` (a temporary name first, then renamed)."""
    from convert.network import SpikingModel
    if not isinstance(snn, SpikingModel):
        raise ValueError(f"save expects a SpikingModel from convert(), got {type(snn).__name__}")
    if snn.architecture is None:
        raise ValueError("cannot save: the ANN's architecture is unknown; build it with models.create_ann or "
                         "timm.create_model so that load() can rebuild it")
    path = Path(path).expanduser()
    config = {"architecture": snn.architecture, "options": snn.options, "timesteps": snn.timesteps,
              "step_mode": snn.step_mode, "calibration_report": snn.calibration_report,
              "versions": {"vit-snn": PACKAGE_VERSION, "timm": timm.__version__, "torch": torch.__version__}}
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in snn.net.state_dict().items()}
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: Path) -> dict:
    """The checkpoint's config; ValueError naming the file when it is not one of ours."""
    if not path.is_file():
        raise FileNotFoundError(f"SNN checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vit-snn SNN checkpoint (no '{FORMAT}' metadata; an ANN state dict "
                         f"goes to --checkpoint, not --load)")
    try:
        version = int(meta.get("version", ""))
        config = json.loads(meta["config"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} has corrupt vit-snn metadata") from None
    if version > VERSION:
        raise ValueError(f"{path} was written by a newer format version ({version} > {VERSION}): "
                         f"upgrade vit-snn to load it")
    return config


def _fit_parameters(net: nn.Module, state: dict) -> None:
    """Give thresholds and bias shifts the shapes the checkpoint holds (per-channel, corrections)."""
    for key, value in state.items():
        module_path, attr = key.rpartition(".")[::2]
        if attr not in ("threshold", "bias_shift"):
            continue
        try:
            module = net.get_submodule(module_path)
        except AttributeError:
            continue
        current = getattr(module, attr, None)
        if current is None or current.shape != value.shape:
            if attr == "threshold":
                setattr(module, attr, nn.Parameter(torch.empty_like(value), requires_grad=False))
            else:
                setattr(module, attr, torch.empty_like(value))


def load(path, device: str = "cpu"):
    """Rebuild the SNN saved at ``path``."""
    from safetensors.torch import load_file
    from convert.api import build_spiking
    path = Path(path).expanduser()
    config = read_metadata(path)
    try:
        state = load_file(str(path), device=device)
        arch = config["architecture"]
        ann = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
    except (SafetensorError, OSError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path} cannot be rebuilt: {exc}") from None
    snn = build_spiking(ann, config["timesteps"], config["options"])
    snn.architecture = arch
    _fit_parameters(snn.net, state)
    try:
        snn.net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} does not fit the network it describes: {first}") from None
    snn.calibration_report = config.get("calibration_report", {})
    return snn.to(device)
