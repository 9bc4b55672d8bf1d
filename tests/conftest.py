"""Tiny random-weight timm ViTs: milliseconds per forward, any configuration a user may bring."""
from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

import models  # noqa: F401  registers vit_fmnist

# under pytest-xdist (`pytest -n auto`) the workers share the cores: torch's threads divided among them, and the
# same count for the processes a test starts (a run resumed in-process continues one a subprocess began, bitwise
# only at the same thread count: float reductions are split by thread)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    THREADS = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

BASE = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)

# name -> kwargs of VisionTransformer (or a callable building the model)
CONFIGS = {
    "cls_token": {},
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg"),
    "register_tokens": dict(reg_tokens=2),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(init_values=0.5),
    "norm_before_avg_pool": dict(global_pool="avg", fc_norm=False),  # LayerNorm per token, then the mean
    "max_pool": dict(class_token=False, global_pool="max"),
    "pre_norm": dict(pre_norm=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "relu_mlp": dict(act_layer=nn.ReLU),
    "no_embed_class": dict(no_embed_class=True),
    "res_post_block": dict(block_fn=ResPostBlock),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
}


def _plain(kwargs: dict) -> bool:
    return all(isinstance(v, (bool, int, float, str)) for v in kwargs.values())


def build(name: str, seed: int = 0, fused: bool = True) -> nn.Module:
    """A tiny random ViT; built by name through timm (so checkpoints can rebuild it) where its options allow."""
    torch.manual_seed(seed)
    if name == "distilled":
        from timm.models.deit import VisionTransformerDistilled
        model = VisionTransformerDistilled(**BASE)
    elif _plain(CONFIGS[name]):
        model = models.create_ann("vit_tiny_patch16_224", pretrained=False, **BASE, **CONFIGS[name])
    else:
        model = VisionTransformer(**{**BASE, **CONFIGS[name]})
    # larger-than-init weights so activations are spread like a trained model's
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model.eval()


ALL_CONFIGS = list(CONFIGS) + ["distilled"]


def option_ids(value):
    """pytest ids for parameters that are convert() option dicts: key=value joined by '-'."""
    return "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 16, 16)
