"""How a model was built, recorded so that a checkpoint can rebuild it without the ANN's weights file.

Two records, captured when the model is created (this module is imported with the package):
- ``timm.create_model(name, **kwargs)``: the name and keyword arguments;
- a timm model class called directly (``VisionTransformer(...)``, ``Eva(...)``): the class and its
  arguments (the outermost class's call wins).

``describe(model)`` turns them into a JSON-able spec; ``rebuild(spec)`` builds an untrained model from it.
Argument values may be numbers, strings, tuples, lists, dicts, dataclasses (timm's model configs),
``functools.partial`` and classes or functions (``act_layer=nn.ReLU``); those are named by import path
and, when rebuilt, resolved only inside ``ALLOWED_MODULES`` (a checkpoint cannot make load() import or
call anything else). ``describe`` verifies the spec: the rebuilt model (on the meta device) must have
the same parameter names and shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Dict, Optional

import timm
import timm.models
import torch
from torch import nn

ALLOWED_MODULES = ("torch.", "timm.", "models.")
CREATE_RECORD = "_vit_snn_create"  # (timm name, kwargs) set by timm.create_model
INIT_RECORD = "_vit_snn_init"  # (class, args, kwargs) set by a timm model class's __init__
_NOT_ARCHITECTURE = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                     "scriptable", "exportable", "no_jit", "device", "dtype")


class ArchitectureError(ValueError):
    """A model whose construction cannot be recorded or rebuilt."""


# --- capture --------------------------------------------------------------------------------------------

def _wrap_create_model(create_model):
    if getattr(create_model, "_records_architecture", False):
        return create_model

    @functools.wraps(create_model)
    def wrapper(model_name: str, *args, **kwargs):
        model = create_model(model_name, *args, **kwargs)
        arch = {k: v for k, v in kwargs.items() if k not in _NOT_ARCHITECTURE}
        object.__setattr__(model, CREATE_RECORD, (model_name.split(".")[0], arch))
        return model

    wrapper._records_architecture = True
    return wrapper


def _wrap_init(cls):
    init = cls.__init__
    if getattr(init, "_records_architecture", False):
        return

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        object.__setattr__(self, INIT_RECORD, (type(self), args, kwargs))  # the outermost __init__ returns last

    wrapper._records_architecture = True
    cls.__init__ = wrapper


def install() -> None:
    """Record the construction of every timm model from now on (idempotent)."""
    timm.create_model = _wrap_create_model(timm.create_model)
    timm.models.create_model = _wrap_create_model(timm.models.create_model)
    for name in dir(timm.models):
        mod = getattr(timm.models, name)
        if not inspect.ismodule(mod) or not mod.__name__.startswith("timm.models."):
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__ and hasattr(cls, "forward_features"):
                _wrap_init(cls)


# --- encoding -------------------------------------------------------------------------------------------

def _path(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def encode(value: Any, where: str = "argument") -> Any:
    """A JSON-able form of a constructor argument."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, where) for v in value]}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode(v, f"{where}.{k}") for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, functools.partial):
        return {"__partial__": encode(value.func, where), "args": [encode(a, where) for a in value.args],
                "keywords": {k: encode(v, where) for k, v in value.keywords.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": _path(type(value)),
                "fields": {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(value) if f.init}}
    if (inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)) \
            and "<locals>" not in value.__qualname__:
        return {"__object__": _path(value)}
    raise ArchitectureError(f"{where} = {value!r} (a {type(value).__name__}) cannot be recorded in a checkpoint")


def _resolve(path: str):
    module, _, qualname = path.partition(":")
    if not module.startswith(ALLOWED_MODULES):
        raise ArchitectureError(f"the checkpoint names {path}, outside the modules a checkpoint may use "
                                f"({', '.join(m.rstrip('.') for m in ALLOWED_MODULES)})")
    try:
        return functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as exc:
        raise ArchitectureError(f"the checkpoint names {path}, which this installation does not have ({exc})") from None


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v) for k, v in value["__dict__"].items()}
    if "__dtype__" in value:
        dtype = getattr(torch, str(value["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ArchitectureError(f"unknown dtype {value['__dtype__']!r} in the checkpoint")
        return dtype
    if "__partial__" in value:
        return functools.partial(decode(value["__partial__"]), *decode(value["args"]),
                                 **{k: decode(v) for k, v in value["keywords"].items()})
    if "__dataclass__" in value:
        cls = _resolve(value["__dataclass__"])
        if not dataclasses.is_dataclass(cls):
            raise ArchitectureError(f"{value['__dataclass__']} is not a dataclass")
        return cls(**{k: decode(v) for k, v in value["fields"].items()})
    if "__object__" in value:
        return _resolve(value["__object__"])
    raise ArchitectureError(f"unreadable architecture value {value!r}")


# --- describe and rebuild ---------------------------------------------------------------------------------

def _shapes(model: nn.Module) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rebuild(spec: Dict[str, Any], device: Optional[str] = None) -> nn.Module:
    """An untrained model built as ``spec`` (from ``describe``) says, in eval mode."""
    kwargs = {k: decode(v) for k, v in spec.get("kwargs", {}).items()}
    with torch.device(device) if device else contextlib.nullcontext():
        if "class" in spec:
            cls = _resolve(spec["class"])
            if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
                raise ArchitectureError(f"{spec['class']} is not a model class")
            model = cls(*decode(spec.get("args", [])), **kwargs)
        else:
            if not timm.is_model(spec["name"]):
                raise ArchitectureError(f"unknown timm model {spec['name']!r} (a newer timm?)")
            model = timm.create_model(spec["name"], pretrained=False, **kwargs)
    return model.eval()


def _candidates(model: nn.Module):
    record = getattr(model, CREATE_RECORD, None)
    if record is not None:
        name, kwargs = record
        yield lambda: {"name": name, "kwargs": {k: encode(v, k) for k, v in kwargs.items()}}
    record = getattr(model, INIT_RECORD, None)
    if record is not None and record[0] is type(model):
        cls, args, kwargs = record
        yield lambda: {"class": _path(cls), "args": encode(list(args)),
                       "kwargs": {k: encode(v, k) for k, v in kwargs.items()}}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch and timm.is_model(arch):
        yield lambda: {"name": arch, "kwargs": {"num_classes": getattr(model, "num_classes", 1000)}}


def describe(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How to rebuild ``model`` (a spec that rebuilds the same parameter names and shapes), or None."""
    mine = _shapes(model)
    for candidate in _candidates(model):
        try:
            spec = candidate()
            if _shapes(rebuild(spec, device="meta")) == mine:
                return spec
        except (ArchitectureError, TypeError, ValueError, RuntimeError, AssertionError):
            continue
    return None


install()
