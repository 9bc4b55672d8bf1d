"""``convert``: ANN -> calibrated spiking network (DESIGN section 2)."""
from __future__ import annotations

import copy
import itertools
import warnings
from functools import partial
from typing import Any, Dict, Optional

import torch
from torch import nn

from calibration import CORRECTIONS, METHODS, calibrate, iter_images
from convert.network import SpikingModel, check_images, check_timesteps, input_spec
from convert.rewrite import Rewriter
from models.neurons import NEURONS, create_neuron
from models.zoo import architecture_of

ATTENTION_VARIANTS = ("ecm", "psa", "ssa", "a2os2a")
RESIDUAL_STYLES = ("membrane", "spike_driven")
FIXED_ALPHABET = ("ssa", "a2os2a")  # attention variants whose Q, K, V neurons are the papers' own

# The defaults: the best training-free settings measured on vit_fmnist (BENCHMARKS.md).
DEFAULTS: Dict[str, Any] = dict(neuron="signed_if", levels=1, v_init=None, calibration="percentile",
                                percentile=99.5, per_channel=True, correction="none", num_images=None, attention="ecm",
                                mask_p=0.0, residual="membrane", step_mode="s", progress=True)


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults and reject unknown keys or values with a message naming them."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}: valid options are {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if opts["neuron"] not in NEURONS:
        raise ValueError(f"unknown neuron {opts['neuron']!r}: use one of {', '.join(NEURONS)}")
    if isinstance(opts["levels"], bool) or not isinstance(opts["levels"], int) or opts["levels"] < 1:
        raise ValueError(f"levels must be a positive integer, got {opts['levels']!r}")
    if opts["calibration"] not in METHODS:
        raise ValueError(f"unknown calibration {opts['calibration']!r}: use one of {', '.join(METHODS)}")
    if not 0.0 < float(opts["percentile"]) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {opts['percentile']}")
    if opts["correction"] not in CORRECTIONS:
        raise ValueError(f"unknown correction {opts['correction']!r}: use one of {', '.join(CORRECTIONS)}")
    if opts["attention"] not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention {opts['attention']!r}: available: {', '.join(ATTENTION_VARIANTS)}")
    if opts["residual"] not in RESIDUAL_STYLES:
        raise ValueError(f"unknown residual {opts['residual']!r}: available: {', '.join(RESIDUAL_STYLES)}")
    _check_variant(opts)
    if opts["step_mode"] not in ("s", "m"):
        raise ValueError(f"unknown step_mode {opts['step_mode']!r}: use 's' (step) or 'm' (multi-step)")
    if opts["num_images"] is not None and (not isinstance(opts["num_images"], int) or opts["num_images"] <= 0):
        raise ValueError(f"num_images must be a positive integer or None, got {opts['num_images']!r}")
    return opts


def _check_variant(opts: Dict[str, Any]) -> None:
    """Attention and residual variants that fix their spike alphabets cannot take every neuron."""
    p = opts["mask_p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"mask_p is the share of spikes masked out, in [0, 1); got {p!r}")
    if p > 0 and opts["attention"] != "psa":
        raise ValueError(f"mask_p={p} applies to attention=psa only (attention is {opts['attention']!r})")
    for what, fixed in (("attention", opts["attention"] in FIXED_ALPHABET),
                        ("residual", opts["residual"] == "spike_driven")):
        if fixed and (opts["levels"] != 1 or opts["neuron"] == "multi_threshold"):
            alphabet = {"ssa": "binary Q, K, V", "a2os2a": "binary Q and ternary V",
                        "spike_driven": "binary inputs to every Linear layer"}[opts[what]]
            raise ValueError(f"{what}={opts[what]} uses {alphabet}: it cannot use neuron={opts['neuron']} with "
                             f"levels={opts['levels']}; use neuron=signed_if (or if, ternary) with levels=1")


def check_finite_weights(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not tensor.is_meta and not tensor.isfinite().all():
            raise ValueError(f"non-finite values (NaN or inf) in the model's weights at {name}")


def build_spiking(ann: nn.Module, timesteps: int, options: Dict[str, Any],
                  inputs: Optional[Dict[str, Any]] = None) -> SpikingModel:
    """The uncalibrated spiking counterpart of ``ann`` (a copy; ``ann`` is left untouched) for images
    described by ``inputs`` (convert.network.input_spec; default: the model's own size)."""
    timesteps = check_timesteps(timesteps)
    opts = check_options(options)
    check_finite_weights(ann)
    inputs = dict(inputs or input_spec(ann))
    net = copy.deepcopy(ann).eval()
    for module in net.modules():  # attention as one F.scaled_dot_product_attention call: the spiking core's place
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    make_neuron = partial(_make_neuron, opts["neuron"], opts["levels"], opts["v_init"])
    device = next(net.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    example = torch.randn(2, inputs["channels"], *inputs["size"], generator=generator).to(device)
    rewriter = Rewriter(make_neuron, attention=opts["attention"], mask_p=float(opts["mask_p"]),
                        spike_driven=opts["residual"] == "spike_driven", fixed_tokens=not inputs["dynamic"],
                        example=example)
    net = rewriter.convert_root(net)
    if rewriter.specialised:  # shape-dependent code was fixed to the conversion's image size
        inputs["dynamic"] = False
    snn = SpikingModel(net, timesteps, opts, step_mode=opts["step_mode"], inputs=inputs)
    snn.architecture = architecture_of(ann)
    return snn


def convert(ann: nn.Module, calibration_data, timesteps: int = 16, architecture: Optional[Dict[str, Any]] = None,
            **options) -> SpikingModel:
    """Rewrite ``ann`` (a timm model, left untouched) into a spiking network and calibrate its thresholds.

    ``architecture``: how to rebuild ``ann`` for checkpoints ({'name': timm name, 'kwargs': {...}}, or
    {'class': 'module:Class', 'args': [...], 'kwargs': {...}}); by default it is recorded when the model
    is created (models.architecture)."""
    if ann.training:
        warnings.warn("the ANN was in train mode; converting it in eval mode", stacklevel=2)
    batches = iter_images(calibration_data)
    first = next(batches, None)
    inputs = input_spec(ann)
    if first is not None:
        if getattr(getattr(ann, "patch_embed", None), "img_size", None) is not None:
            check_images(inputs, first)  # the model states its image size: the data must fit it
        inputs["size"] = list(first.shape[-2:])  # else the calibration images' size is the one converted for
    snn = build_spiking(ann, timesteps, options, inputs)
    if architecture is not None:
        snn.architecture = {**architecture, "source": "given to convert()"}
    opts = snn.options
    device = next(snn.net.parameters()).device
    chained = itertools.chain([] if first is None else [first], batches)
    images = (x.to(device, non_blocking=True) for x in _checked_images(snn, chained))
    snn.calibration_report = calibrate(snn.net, images, method=opts["calibration"],
                                       percentile=float(opts["percentile"]), timesteps=snn.timesteps,
                                       num_images=opts["num_images"], per_channel=opts["per_channel"],
                                       correction=opts["correction"], step_mode=opts["step_mode"],
                                       progress=opts["progress"])
    return snn


def _make_neuron(name: str, levels: int, v_init, signed: bool):
    """v_init None keeps the neuron's own initial membrane (0.5 for IF neurons, 0 for the others)."""
    return create_neuron(name, signed=signed, levels=levels, **({} if v_init is None else {"v_init": v_init}))


def _checked_images(snn: SpikingModel, batches):
    for images in batches:
        check_images(snn.inputs, images)
        yield images
