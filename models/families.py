"""The timm transformer families the converter is measured on, and a tiny random-weight instance of each.

A family is a timm model module (``timm.models.<family>``); its architectures are the names it
registers. ``PURE_ATTENTION`` are the attention-only ViT families, ``HYBRID`` the transformer families
with convolutional stages or stems. ``tiny(name)`` builds a small instance of a family through
``timm.create_model`` (so a saved SNN of it can be rebuilt): milliseconds per forward, every operation
of the family's blocks present.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import timm
import torch
from torch import nn

PURE_ATTENTION = ("vision_transformer", "deit", "eva", "beit", "swin_transformer", "swin_transformer_v2", "cait",
                  "vision_transformer_relpos", "xcit", "naflexvit", "pit", "crossvit")
HYBRID = ("vision_transformer_hybrid", "vision_transformer_sam", "swin_transformer_v2_cr", "hiera", "hieradet_sam2",
          "levit", "maxxvit", "qwen3_vit", "deepseek_vit", "gemma4_vit", "twins", "pvt_v2", "coat", "tiny_vit",
          "mvitv2", "volo", "convit", "davit", "gcvit", "nest", "tnt", "visformer", "efficientformer",
          "efficientformer_v2", "vitamin", "nextvit", "efficientvit_mit", "mobilevit", "edgenext", "fastvit")

# family -> (timm architecture, keyword arguments making it tiny, image size)
TINY: Dict[str, Tuple[str, Dict[str, Any], int]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), 16),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                               num_heads=2), 16),
    "siglip_map_head": ("vit_base_patch16_siglip_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                            num_heads=2), 16),
    "aimv2_swiglu": ("aimv2_large_patch14_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                     num_heads=2), 16),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2), 28),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                                  depths=(2, 2), num_heads=(1, 2)), 32),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                               depths=(2, 2), num_heads=(1, 2)), 32),
    "cait": ("cait_xxs24_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                    depth_token_only=1), 16),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          cls_attn_layers=1), 32),
    "vit_relpos": ("vit_relpos_small_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                        num_heads=2), 16),
    "naflexvit": ("naflexvit_base_patch16_gap", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                     num_heads=2), 16),
    "pit": ("pit_ti_224", dict(img_size=32, patch_size=8, stride=4, base_dims=[16, 16], depth=[1, 1],
                               heads=[2, 2]), 32),
    "crossvit": ("crossvit_tiny_240", dict(img_size=32, img_scale=(1.0, 0.75), patch_size=(8, 8), embed_dim=(16, 32),
                                           depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1)), 32),
    "levit": ("levit_128s", dict(img_size=32, embed_dim=(16, 32), key_dim=8, depth=(1, 1), num_heads=(2, 2)), 32),
    "twins": ("twins_svt_small", dict(img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(1, 2),
                                      mlp_ratios=(2, 2), depths=(1, 1), wss=(2, 2), sr_ratios=(2, 1)), 32),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(1, 1),
                                 sr_ratios=(2, 1)), 32),
    "coat": ("coat_lite_tiny", dict(img_size=32, patch_size=4, embed_dims=(16, 32, 32, 32),
                                    serial_depths=(1, 1, 1, 1), num_heads=8), 32),
    "tiny_vit": ("tiny_vit_5m_224", dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                         window_sizes=(2, 2, 2, 2)), 64),
    "hiera": ("hiera_tiny_224", dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), 64),
    "qwen3_vit": ("qwen3_vit_88m", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "vit_hybrid": ("vit_tiny_r_s16_p8_224", dict(img_size=32, patch_size=1, embed_dim=32, depth=2, num_heads=2), 32),
    "davit": ("davit_tiny", dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), window_size=2), 32),
}


def tiny(name: str, seed: int = 0, num_classes: int = 7) -> Tuple[nn.Module, int]:
    """A tiny random-weight instance of family ``name`` (eval mode) and its image size.

    Weights are drawn with standard deviation 1 / sqrt(fan-in) and layer-scale factors set to 0.5, so
    that every block contributes and activations spread like a trained model's (timm's initialisation
    would leave each block close to the identity)."""
    arch, kwargs, size = TINY[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            elif p.numel() > 1 and 0 < p.abs().max() < 1e-3 and bool((p == p.flatten()[0]).all()):
                p.fill_(0.5)  # a layer scale initialised to a tiny constant
    return model.eval(), size
