"""The ANN side: model names, the embedded reference ViT, and weight loading.

Weights are taken in this order: an explicit checkpoint file (safetensors, or a
torch state dict read with ``weights_only=True``), then timm's pretrained
weights (local Hugging Face cache first, a download when online).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

ALIASES: Dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
}

REFERENCE_WEIGHTS = Path(__file__).parent / "assets" / "vit_fmnist.safetensors"

# The embedded reference model: torchvision's ViT layout (class token, token
# pooling, qkv bias, LayerNorm eps 1e-6), sized for 28x28 grey images.
VIT_FMNIST_ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=4,
                       num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token")


@register_model
def vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Small ViT (4 blocks, dim 96, 4 heads, patch 7: 16 patches + class token) trained on Fashion-MNIST."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model = VisionTransformer(**{**VIT_FMNIST_ARGS, **kwargs})
    if pretrained:
        load_weights(model, REFERENCE_WEIGHTS)
    return model


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
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise FileNotFoundError(
                f"no weights for {timm_name}: not in the local Hugging Face cache and the download failed "
                f"({exc.__class__.__name__}); download them where you are online "
                f"(timm.create_model('{timm_name}', pretrained=True) fills ~/.cache/huggingface) "
                f"or pass --checkpoint FILE (.safetensors or a torch state dict)") from None
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    source = str(checkpoint) if checkpoint else (f"timm:{timm_name}" if pretrained else "random init")
    model.architecture = {"name": timm_name.split(".")[0], "kwargs": dict(kwargs), "source": source}
    return model.eval()


def architecture_of(model: torch.nn.Module) -> Optional[dict]:
    """How to rebuild ``model`` with timm (name, keyword arguments, weight source), or None if unknown.

    Known for models from ``create_ann``; for other timm models, the pretrained config's
    architecture with the model's class count, accepted only if it rebuilds the same tensors."""
    spec = getattr(model, "architecture", None)
    if spec is not None:
        return spec
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        return None
    spec = {"name": arch, "kwargs": {"num_classes": getattr(model, "num_classes", 1000)},
            "source": f"timm:{arch} (weights given in memory)"}
    with torch.device("meta"):
        rebuilt = timm.create_model(arch, pretrained=False, **spec["kwargs"])
    mine = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in rebuilt.state_dict().items()}
    return spec if mine == theirs else None
