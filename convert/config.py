"""Structured configs (one per group) and composition of ``conf/`` with Hydra's Compose API."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig

GROUPS = ("model", "data", "neuron", "calibration", "attention", "finetune", "sweep", "launcher")


@dataclass
class ModelConfig:
    name: str = MISSING
    checkpoint: Optional[str] = None
    pretrained: bool = True


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None
    download: bool = True
    batch_size: int = MISSING
    eval_images: Optional[int] = None


@dataclass
class NeuronConfig:
    name: str = MISSING
    levels: int = MISSING
    v_init: float = MISSING
    coding: str = MISSING
    hysteresis: float = MISSING


@dataclass
class CalibrationConfig:
    method: str = MISSING
    percentile: float = MISSING
    per_channel: bool = MISSING
    per_token: bool = MISSING
    input_offsets: bool = MISSING
    correction: str = MISSING
    num_images: int = MISSING


@dataclass
class AttentionConfig:
    name: str = MISSING
    mask_p: float = MISSING
    mask_rescale: bool = MISSING
    mask_operands: str = MISSING
    mask_schedule: str = MISSING
    mask_fanout: bool = MISSING
    mask_seed: int = MISSING
    map: str = MISSING
    centre_values: bool = MISSING
    residual: str = MISSING
    norm: str = MISSING


@dataclass
class FinetuneConfig:
    epochs: int = MISSING
    lr: Optional[float] = MISSING
    threshold_lr: Optional[float] = None
    weight_decay: float = MISSING
    warmup: float = MISSING
    batch_size: int = MISSING
    timesteps: Optional[int] = None
    images: Optional[int] = None
    surrogate: str = MISSING
    alpha: float = MISSING
    thresholds: bool = MISSING
    weights: bool = MISSING
    distill: float = MISSING
    temperature: float = MISSING
    event_penalty: float = MISSING
    blend: float = MISSING
    feature_distill: float = MISSING
    grad_checkpoint: bool = MISSING
    checkpoint_every: int = MISSING
    resume: Optional[str] = None
    max_steps: Optional[int] = None


@dataclass
class SweepConfig:
    name: str = MISSING
    variants: Optional[Dict[str, Dict[str, Any]]] = field(default_factory=dict)
    energy_images: int = MISSING


@dataclass
class LauncherConfig:
    name: str = MISSING


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    neuron: NeuronConfig = MISSING
    calibration: CalibrationConfig = MISSING
    attention: AttentionConfig = MISSING
    finetune: FinetuneConfig = MISSING
    sweep: SweepConfig = MISSING
    launcher: LauncherConfig = MISSING
    timesteps: int = MISSING
    step_mode: str = MISSING
    chunk: Optional[int] = None
    compile: bool = MISSING
    device: str = MISSING
    seed: int = MISSING
    out: Optional[str] = None
    progress: Optional[bool] = None


def show_progress(setting: Optional[bool]) -> bool:
    """Progress bars on stderr: never when tqdm's TQDM_DISABLE is set, else ``setting``; None (the default):
    only when stderr is a terminal, so that batch-job logs (SLURM, CI) stay readable."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty() if setting is None else bool(setting)


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in zip(GROUPS, (ModelConfig, DataConfig, NeuronConfig, CalibrationConfig, AttentionConfig,
                                    FinetuneConfig, SweepConfig, LauncherConfig)):
        cs.store(group=group, name=f"base_{group}", node=node)


_register()


def group_choices() -> Dict[str, List[str]]:
    """The YAML options of every config group (``base_*`` schemas left out)."""
    root = Path(__file__).resolve().parent.parent / "conf"
    return {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in GROUPS}


def compose_config(overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (``group=choice``, ``key=value``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split()).split(" Config search path")[0]
        message = " ".join(w for w in message.split(" ") if not w.startswith("base_"))
        if exc.__cause__ is not None:
            message += f" ({' '.join(str(exc.__cause__).split()).splitlines()[0][:200]})"
        raise ValueError(f"bad configuration override: {message}") from None
    finally:
        GlobalHydra.instance().clear()


def finetune_options(cfg: DictConfig) -> Dict[str, Any]:
    """The keyword options of ``finetune()`` (all but ``epochs``) that a composed config selects."""
    keys = [k for k in cfg.finetune if k != "epochs"]
    return {**{k: cfg.finetune[k] for k in keys}, "seed": cfg.seed, "progress": cfg.progress}


def convert_options(cfg: DictConfig) -> Dict[str, Any]:
    """The keyword options of ``convert()`` that a composed config selects."""
    return dict(neuron=cfg.neuron.name, levels=cfg.neuron.levels, v_init=cfg.neuron.v_init,
                coding=cfg.neuron.coding, hysteresis=cfg.neuron.hysteresis,
                calibration=cfg.calibration.method, percentile=cfg.calibration.percentile,
                per_channel=cfg.calibration.per_channel, per_token=cfg.calibration.per_token,
                input_offsets=cfg.calibration.input_offsets,
                correction=cfg.calibration.correction,
                num_images=cfg.calibration.num_images,
                attention=cfg.attention.name, mask_p=cfg.attention.mask_p,
                mask_rescale=cfg.attention.mask_rescale, mask_operands=cfg.attention.mask_operands,
                mask_schedule=cfg.attention.mask_schedule, mask_fanout=cfg.attention.mask_fanout,
                mask_seed=cfg.attention.mask_seed,
                attention_map=cfg.attention.map,
                centre_values=cfg.attention.centre_values,
                residual=cfg.attention.residual,
                norm=cfg.attention.norm,
                step_mode=cfg.step_mode, chunk=cfg.chunk, compile=cfg.compile,
                progress=cfg.progress)
