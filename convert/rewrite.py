"""The module-by-module rewrite of a timm ViT into its spiking counterpart.

A registry maps module types to converters. The walk runs over timm's own module
tree and keeps timm's own forward code: containers whose forward only composes
children linearly (VisionTransformer, Block, Mlp, ...) are recursed into;
linear layers get a neuron in front (except the first layer, fed the image);
non-linear stateless modules are wrapped in expectation compensation; timm
``Attention`` becomes ``SpikingAttention``. Anything else is an error that names
the module's type and path.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Set

import timm.layers
import timm.layers.activations
import timm.layers.activations_me
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from models.attention import AdditionOnlyAttention, SpikformerAttention, SpikingAttention
from models.ecm import ExpectationCompensation
from models.neurons import BaseNeuron, IFNeuron
from models.synapse import SpikingSynapse


class UnsupportedModuleError(ValueError):
    """A module the converter does not know how to make spiking."""


Converter = Callable[["Rewriter", nn.Module, str], nn.Module]
CONVERTERS: Dict[type, Converter] = {}


def register(*types: type):
    """Register a converter for module types (subclasses match if they keep the forward)."""
    def deco(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn
    return deco


def _activation_types() -> tuple:
    """Element-wise activations: torch's and every nn.Module class timm's activation registry builds."""
    torch_acts = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU,
                  nn.CELU, nn.SELU, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.PReLU, nn.Softplus)
    timm_acts = tuple(
        cls for mod in (timm.layers.activations, timm.layers.activations_me)
        for _, cls in inspect.getmembers(mod, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__ and cls.__name__ not in ("GLU",)
    )
    return torch_acts + timm_acts


ACTIVATIONS = _activation_types()
NORMS = (nn.LayerNorm, timm.layers.LayerNorm, timm.layers.RmsNorm, nn.GroupNorm)
PASSTHROUGH = (nn.Identity, nn.Dropout, timm.layers.DropPath, timm.layers.LayerScale, timm.layers.PatchDropout)
LINEAR = (nn.Linear, nn.Conv2d)
ATTENTION = (timm.layers.Attention,)
CONTAINERS = (Block, ResPostBlock, nn.Sequential, nn.ModuleList, timm.layers.PatchEmbed)
NONLINEAR_POOLS = ("max", "avgmax")


class Rewriter:
    """Walks a module tree, replacing each module through the registry.

    ``attention``: ecm, psa (with ``mask_p``), ssa or a2os2a; ``spike_driven``: every Linear input is a
    binary IF neuron (Spikingformer) instead of the configured neuron."""

    def __init__(self, make_neuron: Callable[[bool], BaseNeuron], attention: str = "ecm", mask_p: float = 0.0,
                 spike_driven: bool = False) -> None:
        self.make_neuron = make_neuron
        self.attention, self.mask_p, self.spike_driven = attention, mask_p, spike_driven
        self.first_layers: Set[int] = set()
        self.attention_count = 0
        self.fixed_tokens = True  # False for dynamic image sizes: the token count varies between inputs

    def lookup(self, module: nn.Module, path: str) -> Converter:
        cls = type(module)
        if cls in CONVERTERS:
            return CONVERTERS[cls]
        for base in cls.__mro__[1:]:
            if base in CONVERTERS:
                if cls.forward is not base.forward:
                    raise UnsupportedModuleError(
                        f"unsupported module {cls.__name__} at {path or '<root>'}: it overrides the forward of "
                        f"{base.__name__}, so its computation is unknown to the converter")
                return CONVERTERS[base]
        raise UnsupportedModuleError(
            f"unsupported module {cls.__module__}.{cls.__name__} at {path or '<root>'}: the converter has no "
            f"spiking counterpart for it (register one with convert.rewrite.register)")

    def convert(self, module: nn.Module, path: str = "") -> nn.Module:
        return self.lookup(module, path)(self, module, path)

    def convert_children(self, module: nn.Module, path: str) -> nn.Module:
        for name, child in list(module.named_children()):
            setattr(module, name, self.convert(child, f"{path}.{name}" if path else name))
        return module

    def input_neuron(self, signed: bool = True) -> BaseNeuron:
        """The neuron in front of a Linear layer."""
        return IFNeuron(1) if self.spike_driven else self.make_neuron(signed)

    def synapse(self, layer: nn.Module) -> nn.Module:
        """A linear layer fed through a neuron (the first layer keeps its analog input)."""
        return layer if id(layer) in self.first_layers else SpikingSynapse(self.input_neuron(), layer)


@register(VisionTransformer)
def _vision_transformer(rw: Rewriter, model: nn.Module, path: str) -> nn.Module:
    if getattr(model, "global_pool", None) in NONLINEAR_POOLS:
        raise UnsupportedModuleError(f"unsupported global_pool={model.global_pool!r} at {path or '<root>'}: "
                                     f"use 'token', 'avg' or '' (max pooling is not linear)")
    rw.first_layers.add(id(model.patch_embed.proj))
    rw.fixed_tokens = not getattr(model, "dynamic_img_size", False)
    return rw.convert_children(model, path)


try:  # timm's distilled DeiT: two heads averaged in eval, a linear read-out
    from timm.models.deit import VisionTransformerDistilled
    register(VisionTransformerDistilled)(_vision_transformer)
except ImportError:  # pragma: no cover - older timm
    pass


@register(*CONTAINERS)
def _container(rw: Rewriter, module: nn.Module, path: str) -> nn.Module:
    return rw.convert_children(module, path)


@register(*PASSTHROUGH)
def _passthrough(rw: Rewriter, module: nn.Module, path: str) -> nn.Module:
    return module


@register(*LINEAR)
def _linear(rw: Rewriter, module: nn.Module, path: str) -> nn.Module:
    return rw.synapse(module)


@register(*NORMS, *ACTIVATIONS, nn.Softmax)
def _expectation(rw: Rewriter, module: nn.Module, path: str) -> nn.Module:
    return ExpectationCompensation(module)


@register(timm.layers.Mlp)
def _mlp(rw: Rewriter, mlp: nn.Module, path: str) -> nn.Module:
    """fc1 -> act -> fc2. A ReLU followed directly by fc2 becomes a non-negative IF neuron (ReLU -> IF)."""
    if type(mlp.act) is nn.ReLU and isinstance(mlp.norm, nn.Identity):
        mlp.fc1 = rw.convert(mlp.fc1, f"{path}.fc1")
        mlp.act = rw.input_neuron(False)
        return mlp
    return rw.convert_children(mlp, path)


@register(*ATTENTION)
def _attention(rw: Rewriter, attn: nn.Module, path: str) -> nn.Module:
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModuleError(f"unsupported gated attention at {path}: the sigmoid gate is a product "
                                     f"of two analog streams")
    sub = {name: rw.convert(getattr(attn, name), f"{path}.{name}") for name in ("qkv", "q_norm", "k_norm", "norm", "proj")}
    if rw.attention == "ssa":
        return SpikformerAttention(attn, **sub)
    if rw.attention == "a2os2a":
        return AdditionOnlyAttention(attn, **sub)
    rw.attention_count += 1  # each attention module draws its own masks
    return SpikingAttention(attn, rw.make_neuron, fixed_tokens=rw.fixed_tokens, mask_p=rw.mask_p,
                            seed=3 * rw.attention_count, **sub)


def rewrite(model: nn.Module, make_neuron: Callable[[bool], BaseNeuron], path: Optional[str] = "",
            **variant) -> nn.Module:
    """Rewrite ``model`` in place into its spiking counterpart and return it (``variant``: see Rewriter)."""
    return Rewriter(make_neuron, **variant).convert(model, path)
