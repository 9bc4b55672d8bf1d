"""``convert``: ANN -> calibrated spiking network (DESIGN section 2)."""
from __future__ import annotations

import copy
import itertools
import warnings
from functools import partial
from typing import Any, Dict, Optional

import torch
from torch import nn

from calibration import calibrate, iter_images
from convert.config import show_progress
from convert.network import SpikingModel, check_images, check_timesteps, input_spec
from convert.rewrite import Rewriter
from convert.schema import check_combination, validate_options
from models.neurons import create_neuron, set_coding
from models.zoo import architecture_of

ATTENTION_VARIANTS = ("ecm", "psa", "ssa", "a2os2a")
RESIDUAL_STYLES = ("membrane", "spike_driven")
NORM_STYLES = ("ecm", "constant")

# The defaults: training-free; thresholds minimise the quantiser's expected error for the run's T and alphabet
# (calibration.thresholds), checked on every reference model (python -m benchmarks.generalization, BENCHMARKS.md).
DEFAULTS: Dict[str, Any] = dict(neuron="signed_if", levels=1, v_init=None, coding="rate", hysteresis=0.0,
                                calibration="mse",
                                percentile=99.5, per_channel=True, per_token=True, input_offsets=True,
                                correction="none", num_images=None,
                                attention="ecm",
                                mask_p=0.0, mask_rescale=False, mask_operands="q+k+attn", mask_schedule="random",
                                mask_fanout=False, mask_seed=0, attention_map="row_max", centre_values=False,
                                residual="membrane", norm="ecm", step_mode="s",
                                chunk=None, compile=False, progress=True)


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults and reject unknown keys or values with the schema's one-line messages (convert.schema)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}: valid options are {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    validate_options(opts, "convert")
    check_combination(opts)
    return opts


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
                        example=example, mask_rescale=bool(opts["mask_rescale"]), norm=opts["norm"],
                        mask_operands=tuple(opts["mask_operands"].split("+")), mask_schedule=opts["mask_schedule"],
                        centre_values=bool(opts["centre_values"]), attention_map=opts["attention_map"],
                        mask_fanout=bool(opts["mask_fanout"]), mask_seed=int(opts["mask_seed"]))
    net = rewriter.convert_root(net)
    set_coding(net, opts["coding"], float(opts["hysteresis"]))
    if rewriter.specialised:  # shape-dependent code was fixed to the conversion's image size
        inputs["dynamic"] = False
    snn = SpikingModel(net, timesteps, opts, step_mode=opts["step_mode"], chunk=opts["chunk"], inputs=inputs,
                       compile=opts["compile"])
    snn.to(device)  # the rewrite's new modules (neurons, compensations) are made on the CPU
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
    prefix = int(getattr(ann, "num_prefix_tokens", 0) or 0) if opts["per_token"] else 0
    patch = snn.inputs["patch"]
    tokens = prefix + (snn.inputs["size"][0] // patch[0]) * (snn.inputs["size"][1] // patch[1])
    snn.calibration_report = calibrate(snn.net, images, method=opts["calibration"],
                                       percentile=float(opts["percentile"]), timesteps=snn.timesteps,
                                       num_images=opts["num_images"], per_channel=opts["per_channel"],
                                       correction=opts["correction"], offsets=opts["input_offsets"],
                                       step_mode=opts["step_mode"],
                                       progress=show_progress(opts["progress"]), prefix_tokens=prefix, tokens=tokens)
    return snn


def _make_neuron(name: str, levels: int, v_init, signed: bool):
    """v_init None keeps the neuron's own initial membrane (0.5 for IF neurons, 0 for the others)."""
    return create_neuron(name, signed=signed, levels=levels, **({} if v_init is None else {"v_init": v_init}))


def _checked_images(snn: SpikingModel, batches):
    for images in batches:
        check_images(snn.inputs, images)
        yield images
