"""The ANN side: model names, the embedded reference ViT, and weight loading.

Weights are taken in this order: an explicit checkpoint file (safetensors, or a
torch state dict read with ``weights_only=True``), then timm's pretrained
weights (local Hugging Face cache first, a download when online).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlparse

import timm
import torch
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from models.architecture import describe

ALIASES: Dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
}

ASSETS = Path(__file__).parent / "assets"
# arch -> '' (converts) or the converter's reason, for every timm transformer architecture with pretrained
# weights; written by ``python -m benchmarks.coverage``, read by ``python -m convert --list-models``
COVERAGE_TABLE = Path(__file__).parent / "coverage.json"
REFERENCE_WEIGHTS = ASSETS / "vit_fmnist.safetensors"

# The Fashion-MNIST reference models (28x28 grey images, 10 classes), each trained by
# ``python -m models.train_reference --model NAME`` and shipped in models/assets/NAME.safetensors.
# vit_fmnist, the embedded default, keeps torchvision's ViT layout (class token, token pooling, qkv bias,
# LayerNorm eps 1e-6). The others differ in what the defaults must generalise over: the token count and
# the class token (vit_fmnist_p4), pooling without class token (vit_fmnist_gap), and another family
# (swin_fmnist: windows, shifted-window masks, relative position bias, patch merging).
FMNIST_MODELS: Dict[str, tuple] = {
    "vit_fmnist": (VisionTransformer, dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96,
                                           depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                                           global_pool="token")),
    "vit_fmnist_p4": (VisionTransformer, dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                                              depth=4, num_heads=4, mlp_ratio=4.0, class_token=True,
                                              global_pool="token")),
    "vit_fmnist_gap": (VisionTransformer, dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96,
                                               depth=4, num_heads=4, mlp_ratio=4.0, class_token=False,
                                               global_pool="avg")),
    "swin_fmnist": (SwinTransformer, dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, window_size=7,
                                          embed_dim=48, depths=(2, 2), num_heads=(2, 4), mlp_ratio=4.0)),
}
VIT_FMNIST_ARGS = FMNIST_MODELS["vit_fmnist"][1]


def _fmnist_entrypoint(name: str):
    cls, defaults = FMNIST_MODELS[name]

    def entrypoint(pretrained: bool = False, **kwargs) -> torch.nn.Module:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        model = cls(**{**defaults, **kwargs})
        if pretrained:
            weights = ASSETS / f"{name}.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"no weights for {name} in {ASSETS}: train them with "
                                        f"python -m models.train_reference --model {name}")
            load_weights(model, weights)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{cls.__name__} trained on Fashion-MNIST ({', '.join(f'{k}={v}' for k, v in defaults.items())})."
    entrypoint.__module__ = __name__
    return register_model(entrypoint)


for _name in FMNIST_MODELS:
    globals()[_name] = _fmnist_entrypoint(_name)


def resolve_name(name: str) -> str:
    """Alias -> timm name; any timm model name passes as is; else ValueError with suggestions."""
    if name in ALIASES:
        return ALIASES[name]
    base = name.split(".")[0]
    if timm.is_model(base):
        return name
    candidates = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(base, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() or the aliases " + ", ".join(ALIASES)
    raise ValueError(f"unknown model {name!r}{hint}")


def convertible_models(pattern: str = "*") -> tuple:
    """([(name, status)], footer) for the reference models, the aliases and every pretrained timm name matching
    ``pattern`` (fnmatch) whose architecture is in the coverage table."""
    table = json.loads(COVERAGE_TABLE.read_text()) if COVERAGE_TABLE.is_file() else {"architectures": {}}
    archs = table["architectures"]

    def status(timm_name: str) -> Optional[str]:
        reason = archs.get(timm_name.split(".")[0])
        return None if reason is None else ("converts" if reason == "" else f"does not convert: {reason}")

    rows = [(n, "converts (Fashion-MNIST reference, embedded)" if (ASSETS / f"{n}.safetensors").is_file()
             else f"converts (Fashion-MNIST reference; train it: python -m models.train_reference --model {n})")
            for n in FMNIST_MODELS if fnmatch.fnmatch(n, pattern)]
    rows += [(a, f"{status(t) or 'not in the coverage table'} (alias of {t})") for a, t in ALIASES.items()
             if fnmatch.fnmatch(a, pattern)]
    rows += [(n, status(n)) for n in timm.list_models(pattern, pretrained=True) if status(n) is not None]
    ok = sum(s.startswith("converts") for _, s in rows)
    source = (f"coverage table of timm {table['timm']} ({table['date']}, python -m benchmarks.coverage)"
              if archs else f"no coverage table ({COVERAGE_TABLE} missing: run python -m benchmarks.coverage)")
    return rows, f"{ok} of {len(rows)} listed convert; {source}; timm here: {timm.__version__}"


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint (never unpickles code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read as a torch state dict with weights_only=True "
                         f"({str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model``; keys and shapes must fit exactly."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:3]}")
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {model.__class__.__name__}: " + "; ".join(problems))
    model.load_state_dict(state)


def create_ann(name: str, checkpoint: Optional[str] = None, pretrained: bool = True, **kwargs) -> torch.nn.Module:
    """The ANN in eval mode, with weights from ``checkpoint`` or timm's pretrained tag."""
    timm_name = resolve_name(name)
    if checkpoint:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        load_weights(model, checkpoint)
    elif pretrained:
        source = _weights_source(timm_name)
        cached = source is not None and _cached(source)
        if source is not None and not cached:
            _check_reachable(timm_name, source)
        try:
            with _hub_offline(cached):
                model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise FileNotFoundError(
                f"no weights for {timm_name}: not in the local Hugging Face cache and the download failed "
                f"({exc.__class__.__name__}); download them where you are online "
                f"(timm.create_model('{timm_name}', pretrained=True) fills ~/.cache/huggingface) "
                f"or pass --checkpoint FILE (.safetensors or a torch state dict)") from None
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    model.weights_source = str(checkpoint) if checkpoint else (f"timm:{timm_name}" if pretrained else "random init")
    return model.eval()


def _weights_source(timm_name: str) -> Optional[tuple]:
    """Where timm downloads the pretrained weights of ``timm_name`` from: ('hf', repo, file names) or
    ('url', url); None when it does not download (models registered with their own weights)."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin",
                                                                    "open_clip_model.safetensors"]
        return "hf", cfg.hf_hub_id.split("@")[0], names
    return ("url", cfg.url) if cfg.url else None


def _cached(source: tuple) -> bool:
    """Whether the weights are already in the local Hugging Face or torch hub cache."""
    if source[0] == "hf":
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(source[1], n), str) for n in source[2])
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(source[1]).path).name).is_file()


def _check_reachable(timm_name: str, source: tuple, timeout: float = 3.0) -> None:
    """FileNotFoundError within ``timeout`` seconds when the weights' host cannot be reached (offline, or
    HF_HUB_OFFLINE set), instead of a minute of download retries."""
    from huggingface_hub import constants
    url = constants.ENDPOINT if source[0] == "hf" else source[1]
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE and source[0] == "hf" else None
    if why is None:
        parts = urlparse(url)
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=timeout).close()
            return
        except OSError as exc:
            why = f"{parts.hostname} cannot be reached: {exc.strerror or exc.__class__.__name__}"
    raise FileNotFoundError(
        f"no weights for {timm_name}: not in the local cache and {why}; download them where you are online "
        f"(timm.create_model('{timm_name}', pretrained=True) fills ~/.cache/huggingface) "
        f"or pass --checkpoint FILE (.safetensors or a torch state dict)")


@contextmanager
def _hub_offline(enabled: bool):
    """Hugging Face Hub in offline mode (cached files only, no revision check) while ``enabled``."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def architecture_of(model: torch.nn.Module) -> Optional[dict]:
    """How to rebuild ``model`` (models.architecture.describe) and where its weights came from, or None."""
    spec = describe(model)
    if spec is None:
        return None
    return {**spec, "source": getattr(model, "weights_source", "weights given in memory")}
