"""What each traced operation is, for the graph rewrite (convert.rewrite).

An operation applied to an activation stream is one of:
- ``linear``: linear (or affine with constant terms) in its stream arguments: reshapes, sums, concatenation,
  padding, pooling by averages, interpolation, products with constants. Kept as it is: the running mean
  of its output is the operation applied to the running means of its inputs.
- ``layer``: a functional Linear / Conv (``F.linear``, ``F.conv2d``) with constant weights: a neuron is put
  in front of its input.
- ``product``: a bilinear product of two streams (``@``, ``*``, ``einsum``): a neuron on each operand and
  the product in expectation.
- ``attention``: ``F.scaled_dot_product_attention``: the spiking attention core (models.attention).
- ``nonlinear``: a stateless function (GELU, softmax, LayerNorm, F.normalize, max, sqrt, ...): computed in
  expectation.
- ``shape``: reads only the shape, dtype or device of a stream: a constant.
Anything else applied to a stream is refused by name: the converter never guesses what an unknown
operation computes.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F

import timm.layers.attention
import timm.layers.pos_embed


def _timm(module: str, *names: str):
    """Functions of timm model modules that timm's FX tracer keeps as leaves (absent ones skipped)."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError:  # pragma: no cover - older timm
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


# --- operations linear in every stream argument (constants may be added or multiplied in) ---
LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, operator.iadd, operator.isub,
    torch.add, torch.sub, torch.subtract, torch.neg, torch.negative, torch.cat, torch.concat, torch.concatenate,
    torch.stack, torch.hstack, torch.vstack, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.swapaxes, torch.movedim, torch.roll, torch.flip, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.tensor_split, torch.unbind, torch.narrow, torch.select, torch.index_select, torch.gather,
    torch.take_along_dim, torch.sum, torch.mean, torch.cumsum, torch.tril, torch.triu, torch.diagonal,
    torch.t, torch.clone, torch.repeat_interleave, torch.tile, torch.broadcast_to, torch.real,
    F.pad, F.interpolate, F.upsample, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.fold, F.unfold, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle,
    torch._assert, builtins.getattr,
    *_timm("timm.models.swin_transformer", "window_reverse", "window_partition"),
    *_timm("timm.models.swin_transformer_v2", "window_reverse", "window_partition"),
    *_timm("timm.models.swin_transformer_v2_cr", "window_reverse", "window_partition"),
    *_timm("timm.models.maxxvit", "window_reverse", "window_reverse_nchw", "grid_reverse", "grid_reverse_nchw",
           "window_partition", "grid_partition"),
    *_timm("timm.models.gcvit", "window_reverse", "window_partition"),
    *_timm("timm.models.davit", "window_reverse", "window_partition"),
    *_timm("timm.models.nest", "deblockify", "blockify"),
    *_timm("timm.models.mvitv2", "reshape_pre_pool", "reshape_post_pool", "cal_rel_pos_type"),
    *_timm("timm.models.crossvit", "scale_image"),
    *_timm("timm.models.qwen3_vit", "resample_pos_embed_grid"),
    timm.layers.attention.maybe_add_mask,
    timm.layers.pos_embed.resample_abs_pos_embed, timm.layers.pos_embed.resample_abs_pos_embed_nhwc,
}
LINEAR_METHODS = {
    "add", "add_", "sub", "sub_", "neg", "__getitem__", "reshape", "view", "view_as", "reshape_as", "permute",
    "transpose", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
    "repeat_interleave", "tile", "chunk", "split", "tensor_split", "unbind", "narrow", "select", "index_select",
    "gather", "roll", "flip", "movedim", "swapaxes", "swapdims", "sum", "mean", "cumsum", "tril", "triu", "diagonal",
    "to", "float", "double", "half", "bfloat16", "type", "type_as", "clone", "t", "detach", "masked_fill",
    "masked_fill_", "fill_diagonal_", "broadcast_to",
}
# getattr(x, name): the shape-like attributes are constants, transposes are linear
SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
LINEAR_ATTRIBUTES = {"T", "mT", "H", "mH", "data", "real"}
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device", "new_zeros", "new_ones", "new_empty", "new_full",
                 "new_tensor", "element_size", "is_contiguous", "is_floating_point", "zero_"}
SHAPE_FUNCTIONS = {builtins.len, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                   torch.rand_like, torch.numel, torch.is_floating_point, torch.result_type}

# linear only under a condition on which arguments are streams: products with one stream operand, divisions
# by constants, selections by constant conditions
CONDITIONAL = {
    operator.mul: "one_stream", torch.mul: "one_stream", torch.multiply: "one_stream", "mul": "one_stream",
    "mul_": "one_stream", operator.imul: "one_stream",
    operator.matmul: "one_stream", torch.matmul: "one_stream", torch.bmm: "one_stream", torch.mm: "one_stream",
    "matmul": "one_stream", "bmm": "one_stream", "mm": "one_stream", torch.einsum: "one_stream",
    operator.truediv: "numerator", torch.div: "numerator", torch.true_divide: "numerator", "div": "numerator",
    "div_": "numerator", "true_divide": "numerator", operator.itruediv: "numerator",
    torch.where: "not_condition", "where": "not_condition",
}
PRODUCTS = {operator.mul, torch.mul, torch.multiply, "mul", "mul_", operator.imul, operator.matmul, torch.matmul,
            torch.bmm, torch.mm, "matmul", "bmm", "mm", torch.einsum}
LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
ATTENTION = {F.scaled_dot_product_attention}

# stateless non-linear functions: computed in expectation (one MAC per output element per step, analog)
NONLINEAR_FUNCTIONS = {
    F.gelu, F.silu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.sigmoid, F.tanh, F.softplus, F.mish, F.softmax, F.log_softmax, F.softmin, F.normalize, F.layer_norm,
    F.group_norm, F.rms_norm, F.instance_norm, F.batch_norm, F.local_response_norm, F.glu, F.logsigmoid,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.hardshrink, F.softshrink, F.tanhshrink, F.prelu, F.rrelu,
    torch.sigmoid, torch.tanh, torch.exp, torch.exp2, torch.expm1, torch.log, torch.log1p, torch.log2,
    torch.sqrt, torch.rsqrt, torch.abs, torch.square, torch.pow, torch.softmax, torch.log_softmax, torch.clamp,
    torch.clip, torch.maximum, torch.minimum, torch.max, torch.min, torch.amax, torch.amin, torch.norm, torch.linalg.norm,
    torch.linalg.vector_norm, torch.logsumexp, torch.var, torch.std, torch.var_mean, torch.std_mean,
    torch.erf, torch.sin, torch.cos, torch.reciprocal, torch.relu, torch.sign, torch.special.erf,
    torch.nn.functional.layer_norm, torch.cdist, torch.atan2, torch.nan_to_num, torch.frac,
    operator.pow, operator.abs,
    *_timm("timm.models.naflexvit", "global_pool_naflex"),
    *_timm("timm.layers.activations", "swish", "mish", "hard_sigmoid", "hard_swish", "hard_mish", "gelu",
           "gelu_tanh", "quick_gelu", "sigmoid", "tanh"),
}
NONLINEAR_METHODS = {
    "max", "min", "sigmoid", "tanh", "exp", "exp2", "log", "log1p", "sqrt", "rsqrt", "abs", "square", "pow", "softmax",
    "log_softmax", "clamp", "clip", "clamp_min", "clamp_max", "amax", "amin", "norm", "logsumexp", "var", "std",
    "relu", "erf", "sin", "cos", "reciprocal", "sign", "maximum", "minimum", "__pow__", "__rpow__",
    "__rtruediv__", "sigmoid_", "tanh_", "relu_", "clamp_", "clamp_min_", "exp_", "sqrt_", "pow_", "abs_",
    "reciprocal_", "nan_to_num",
}
# operations whose output can never be negative: the neuron in front of a Linear after them is unsigned
NONNEGATIVE = {F.softmax, torch.softmax, "softmax", F.sigmoid, torch.sigmoid, "sigmoid", F.relu, torch.relu, "relu",
               F.relu6, F.hardsigmoid, torch.exp, "exp"}
RELU = {F.relu, torch.relu, "relu", "relu_"}


def is_relu(op: str, target: Any) -> bool:
    """A functional ReLU (``F.relu``, ``torch.relu``, ``x.relu()``)."""
    return op in ("call_function", "call_method") and target in RELU


def describe(op: str, target: Any) -> str:
    if op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", "") or ""
    return f"{module}.{name}" if module and not module.startswith("_operator") else name
