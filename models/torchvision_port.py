"""A timm ViT in torchvision's layout, weights copied 1:1, for peers that only accept torchvision's ViT.

    tv = to_torchvision(ann)      # torchvision.models.VisionTransformer computing ann's outputs

Supported: the layout the two share (class token, token pooling, pre-norm blocks with
qkv bias, exact GELU, LayerNorm, no LayerScale / qk-norm / fc-norm / register tokens,
square images and patches). Anything else is a ValueError naming what differs. A
single-channel model gets a single-channel patch embedding (torchvision hard-codes 3).
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer as TimmViT
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def _check(ann: nn.Module) -> None:
    problems = []
    if not isinstance(ann, TimmViT):
        problems.append(f"a {type(ann).__name__}, not a timm VisionTransformer")
    else:
        if ann.cls_token is None or ann.global_pool != "token":
            problems.append("no class-token pooling")
        if getattr(ann, "num_reg_tokens", 0) or getattr(ann, "no_embed_class", False):
            problems.append("register tokens or position embeddings without the class token")
        if not isinstance(ann.norm_pre, nn.Identity) or not isinstance(ann.fc_norm, nn.Identity):
            problems.append("pre-norm or fc-norm")
        for i, block in enumerate(ann.blocks):
            attn = block.attn
            if type(block) is not Block or not isinstance(block.ls1, nn.Identity) \
                    or not isinstance(attn.q_norm, nn.Identity) or attn.qkv.bias is None \
                    or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
                problems.append(f"block {i} is not a plain pre-norm block with qkv bias")
                break
            if not (isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"):
                problems.append(f"block {i} does not use exact GELU")
                break
        size, patch = ann.patch_embed.img_size, ann.patch_embed.patch_size
        if size[0] != size[1] or patch[0] != patch[1]:
            problems.append("non-square images or patches")
    if problems:
        raise ValueError(f"cannot port to torchvision's VisionTransformer: {'; '.join(problems)}")


@torch.no_grad()
def to_torchvision(ann: nn.Module) -> VisionTransformer:
    """torchvision's VisionTransformer with ``ann``'s weights (eval mode)."""
    _check(ann)
    blocks = list(ann.blocks)
    mlp_dim = blocks[0].mlp.fc1.out_features
    eps = blocks[0].norm1.eps
    tv = VisionTransformer(image_size=ann.patch_embed.img_size[0], patch_size=ann.patch_embed.patch_size[0],
                           num_layers=len(blocks), num_heads=blocks[0].attn.num_heads, hidden_dim=ann.embed_dim,
                           mlp_dim=mlp_dim, num_classes=ann.num_classes,
                           norm_layer=lambda d: nn.LayerNorm(d, eps=eps))
    proj = ann.patch_embed.proj
    if proj.in_channels != tv.conv_proj.in_channels:
        tv.conv_proj = nn.Conv2d(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride)
    tv.conv_proj.load_state_dict(proj.state_dict())
    tv.class_token.copy_(ann.cls_token)
    tv.encoder.pos_embedding.copy_(ann.pos_embed)
    for block, layer in zip(blocks, tv.encoder.layers):
        layer.ln_1.load_state_dict(block.norm1.state_dict())
        layer.self_attention.in_proj_weight.copy_(block.attn.qkv.weight)
        layer.self_attention.in_proj_bias.copy_(block.attn.qkv.bias)
        layer.self_attention.out_proj.load_state_dict(block.attn.proj.state_dict())
        layer.ln_2.load_state_dict(block.norm2.state_dict())
        layer.mlp[0].load_state_dict(block.mlp.fc1.state_dict())
        layer.mlp[3].load_state_dict(block.mlp.fc2.state_dict())
    tv.encoder.ln.load_state_dict(ann.norm.state_dict())
    tv.heads.head.load_state_dict(ann.head.state_dict())
    return tv.eval()
