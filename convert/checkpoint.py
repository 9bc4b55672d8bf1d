"""SNN checkpoints: safetensors tensors plus the full conversion config as metadata (never a pickle).

Metadata: ``format`` ("vit-snn"), ``version``, and ``config`` (JSON): the ANN's timm
architecture (name and keyword arguments), the conversion options, T, step mode,
the calibration and fine-tuning reports, and the package, timm and torch versions.
``load`` rebuilds the spiking network from the architecture alone: no ANN weights
file is needed. A fine-tuning checkpoint also holds the optimiser state under the
``finetune_state/`` prefix (tensors) and ``config["finetune_state"]``; ``load`` ignores both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from models.architecture import rebuild
from models.files import replacing

FORMAT = "vit-snn"
TRAINING_PREFIX = "finetune_state/"
VERSION = 1
PACKAGE_VERSION = "0.1.0"


def save(snn, path, training_state: Optional[Tuple[Dict[str, torch.Tensor], dict]] = None) -> Path:
    """Write ``snn`` to ``path`` (a temporary name first, then renamed).

    ``training_state``: (tensors, metadata) of an unfinished fine-tuning run, for ``finetune(resume=...)``."""
    from convert.network import SpikingModel
    if not isinstance(snn, SpikingModel):
        raise ValueError(f"save expects a SpikingModel from convert(), got {type(snn).__name__}")
    if snn.architecture is None:
        raise ValueError("cannot save: how the ANN was built is unknown (it was created before vit-snn was "
                         "imported, or by code that timm does not know): create it after importing vit-snn, with "
                         "timm.create_model or a timm model class, or pass convert(..., architecture={'name': "
                         "<timm name>, 'kwargs': {...}})")
    path = Path(path).expanduser()
    config = {"architecture": snn.architecture, "inputs": snn.inputs, "options": snn.options, "timesteps": snn.timesteps,
              "step_mode": snn.step_mode, "calibration_report": snn.calibration_report,
              "finetune_report": snn.finetune_report,
              "versions": {"vit-snn": PACKAGE_VERSION, "timm": timm.__version__, "torch": torch.__version__}}
    tensors, config["aliases"] = _unshared(snn.net.state_dict())
    if training_state is not None:
        extra, config["finetune_state"] = training_state
        tensors.update({TRAINING_PREFIX + k: v.detach().cpu().contiguous() for k, v in extra.items()})
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config)}
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: folder {path.parent} does not exist")
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _unshared(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors to write, each storage once: a tensor reachable under two names (a module shared by two
    parents) is written under its first name, the others recorded as aliases."""
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    first: Dict[tuple, str] = {}
    storages = set()
    for key, value in state.items():
        value = value.detach()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                 value.dtype) if value.numel() else None
        if ident is not None and ident in first:
            aliases[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        shared = value.numel() and value.untyped_storage().data_ptr() in storages
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value.cpu().clone() if shared else value.cpu().contiguous()
    return tensors, aliases


# what a conversion did before each of these options existed: attention_map (2026-12-07) spiked the softmax;
# mask_fanout and mask_seed (2026-12-08) dropped masked spikes and drew seed 0
BEFORE_OPTIONS = {"attention_map": "softmax", "mask_fanout": False, "mask_seed": 0}


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
    if isinstance(config.get("options"), dict):  # an option a file predates: what its conversion did
        config["options"] = {**BEFORE_OPTIONS, **config["options"]}
    return config


# set by calibration
CALIBRATED = ("threshold", "bias_shift", "input_offset", "out_gain", "out_shift", "norm_gain", "norm_shift")


def _fit_parameters(net: nn.Module, state: dict) -> None:
    """Give thresholds, bias shifts, input offsets, output affine maps and constant norms the shapes the
    checkpoint holds (per-channel, corrections, offsets, softmax-free attention, norm=constant)."""
    for key, value in state.items():
        module_path, attr = key.rpartition(".")[::2]
        if attr not in CALIBRATED:
            continue
        try:
            module = net.get_submodule(module_path)
        except AttributeError:
            continue
        current = getattr(module, attr, None)
        if current is None or current.shape != value.shape:
            if attr == "threshold":
                setattr(module, attr, nn.Parameter(torch.empty_like(value), requires_grad=False))
            elif attr.startswith(("out_", "norm_")):
                setattr(module, attr, nn.Parameter(torch.empty_like(value)))
            else:
                setattr(module, attr, torch.empty_like(value))


def _load_weights(net: nn.Module, state: dict, path: Path, aliases: Optional[Dict[str, str]] = None) -> None:
    for alias, key in (aliases or {}).items():
        if key not in state:
            raise ValueError(f"{path} has corrupt vit-snn metadata (alias {alias} of a missing tensor {key})")
        state[alias] = state[key]
    _fit_parameters(net, state)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} does not fit the network it describes: {first}") from None


def load(path, device: str = "cpu"):
    """Rebuild the SNN saved at ``path``."""
    from safetensors.torch import load_file
    from convert.api import build_spiking
    path = Path(path).expanduser()
    config = read_metadata(path)
    try:
        state = {k: v for k, v in load_file(str(path), device=device).items() if not k.startswith(TRAINING_PREFIX)}
        arch = config["architecture"]
        ann = rebuild(arch)
    except (SafetensorError, OSError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} cannot be rebuilt: {exc}") from None
    snn = build_spiking(ann, config["timesteps"], config["options"], config.get("inputs"))
    snn.architecture = arch
    _load_weights(snn.net, state, path, config.get("aliases"))
    snn.calibration_report = config.get("calibration_report", {})
    snn.finetune_report = config.get("finetune_report")
    return snn.to(device)


def load_training_state(path, snn, origin: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Weights of a fine-tuning checkpoint into ``snn`` (which must be the same conversion and, given its
    ``origin`` fingerprint, the network the run started from), and its optimiser tensors and progress metadata."""
    from safetensors.torch import load_file
    path = Path(path).expanduser()
    config = read_metadata(path)
    if "finetune_state" not in config:
        raise ValueError(f"{path} holds no fine-tuning state (a final SNN checkpoint, not one written during "
                         f"fine-tuning): resume from a checkpoint that finetune wrote while running")
    theirs = {k: config.get(k) for k in ("architecture", "options")}
    ours = {"architecture": snn.architecture, "options": snn.options}
    if json.loads(json.dumps(ours)) != theirs:
        diff = [k for k in ours if json.loads(json.dumps(ours[k])) != theirs[k]]
        raise ValueError(f"cannot resume from {path}: it was fine-tuned from another conversion "
                         f"(its {' and '.join(diff)} differ from this network's)")
    if origin is not None and config["finetune_state"].get("origin", origin) != origin:  # older files: not recorded
        raise ValueError(f"cannot resume from {path}: the network passed in is not the one this fine-tuning started "
                         f"from (its weights differ), and the distillation teacher is taken from it; pass a fresh "
                         f"conversion with the same options")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    state = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_PREFIX)}
    _load_weights(snn.net, state, path, config.get("aliases"))
    extra = {k[len(TRAINING_PREFIX):]: v for k, v in tensors.items() if k.startswith(TRAINING_PREFIX)}
    return extra, config["finetune_state"]
