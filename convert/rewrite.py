"""The rewrite of any traceable timm model into its spiking counterpart (DESIGN sections 3 and 9).

Each module's own ``forward`` is traced with torch.fx one level deep (every submodule call is one node)
and rewritten; submodules called on activation streams are rewritten the same way, recursively, so
the module tree, its names and its weights stay timm's. Every value in a traced graph is a *constant*
(weights, shapes, masks and position tables computed from them), the *image* (fed as analog current at
every step, through linear operations only) or an activation *stream*. Operations on streams become:

- a Linear / Conv (module or ``F.linear`` / ``F.conv2d``): a neuron in front of its input
  (``SpikingSynapse``), except when its input is the image (the first layer stays analog); a ReLU
  whose only use is such a layer becomes that layer's (non-negative IF) neuron;
- ``F.scaled_dot_product_attention``: the spiking attention core of the configured variant;
- a product of two streams (``@``, ``*``, ``einsum``): a neuron on each operand and the product in
  expectation (``SpikingProduct``);
- a non-linear stateless function or module (LayerNorm, GELU, softmax, F.normalize, max, ...):
  expectation compensation (with ``norm=constant``, a LayerNorm / RMSNorm over the last axis becomes a
  ``ConstantNorm`` instead: a calibrated per-channel affine map, linear);
- a linear operation (reshapes, sums, concatenation, window partition, roll, padding, average pooling,
  products with constants): kept as it is.

The tables of convert.ops say which operation is which; an operation on a stream that they do not
know, or code whose control flow depends on the data, is an ``UnsupportedModuleError`` naming the
module's path and the operation: nothing is converted silently wrong. The converted modules keep
their class names and attributes; their ``forward`` runs the rewritten graph (``module.graph``).
"""
from __future__ import annotations

import copy
import enum
import functools
import inspect
import operator
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import timm.layers
import timm.layers._fx as timm_fx
import torch.utils._pytree as pytree
import timm.layers.activations
import timm.layers.activations_me
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import PH

from convert import ops
from models.attention import MASK_OPERANDS, MASK_SEED_STRIDE, SpikingSDPA
from models.ecm import ExpectationCompensation, Method, SpikeProduct
from models.neurons import BaseNeuron, IFNeuron
from models.normalization import ConstantNorm
from models.synapse import SpikingProduct, SpikingSynapse


class UnsupportedModuleError(ValueError):
    """A module or operation the converter cannot make spiking."""


class Kind(enum.IntEnum):
    """What a traced value depends on (the larger wins when values combine)."""
    CONST = 0   # weights, shapes, masks and tables computed from them: the same at every step
    IMAGE = 1   # the input image through linear operations only (analog current at every step)
    STREAM = 2  # an activation stream (spikes or their expectation-compensated functions)


def _activation_types() -> tuple:
    """Element-wise activations: torch's and every nn.Module class timm's activation registry builds."""
    torch_acts = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU,
                  nn.CELU, nn.SELU, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.PReLU, nn.Softplus, nn.Hardtanh,
                  nn.GLU, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink)
    timm_acts = tuple(
        cls for mod in (timm.layers.activations, timm.layers.activations_me)
        for _, cls in inspect.getmembers(mod, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__
    )
    return torch_acts + timm_acts


ACTIVATIONS = _activation_types()
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, timm.layers.LayerNorm, timm.layers.LayerNorm2d,
         timm.layers.RmsNorm, timm.layers.RmsNorm2d, timm.layers.GroupNorm, timm.layers.GroupNorm1)
TOKEN_NORMS = (nn.LayerNorm, timm.layers.LayerNorm, timm.layers.RmsNorm)  # over the last axis: ConstantNorm can take them
NONLINEAR_MODULES = NORMS + ACTIVATIONS + (nn.Softmax, nn.LogSoftmax, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                                           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules linear (affine) in their input that need no tracing
AFFINE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, timm.layers.DropPath,
                  nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten,
                  nn.Upsample, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle, timm.layers.LayerScale)

Converter = Callable[["Rewriter", nn.Module, str], nn.Module]
CONVERTERS: Dict[type, Converter] = {}


def register(*types: type):
    """Register a converter ``fn(rewriter, module, path) -> spiking module`` for module types: called on
    streams, such a module is replaced as a whole instead of traced (exact types only)."""
    def deco(fn: Converter) -> Converter:
        for t in types:
            CONVERTERS[t] = fn
        return fn
    return deco


@register(*NONLINEAR_MODULES)
def _expectation(rw: "Rewriter", module: nn.Module, path: str) -> nn.Module:
    return ExpectationCompensation(module)


@register(*TOKEN_NORMS)
def _token_norm(rw: "Rewriter", module: nn.Module, path: str) -> nn.Module:
    """norm=constant: a per-token norm over the last axis becomes ``ConstantNorm``; else (and for norms over
    several axes) it is computed in expectation."""
    if rw.norm == "constant" and len(module.normalized_shape) == 1:
        return ConstantNorm(module)
    return ExpectationCompensation(module)


class _Tracer(fx.Tracer):
    """One level deep: every submodule call is a node; timm's no-trace functions stay single nodes."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


_UNKNOWN = object()


class _ValueProxy(fx.Proxy):
    """A proxy whose value on the example input is known: it can be used as an int, a length or a condition."""

    def __index__(self) -> int:
        return self.tracer.concrete(self, int)

    __int__ = __index__

    def __float__(self) -> float:
        return self.tracer.concrete(self, float)

    def __len__(self) -> int:
        return self.tracer.concrete(self.tracer.create_proxy("call_function", len, (self,), {}), int)


class _ValueTracer(_Tracer):
    """Tracing that also computes every value on an example call (on the meta device), so that control flow
    on shapes can be decided: the graph is specialised to the example's shapes, and an assertion node
    checks each decision at run time (a differently shaped input is an error, never a wrong result)."""

    def __init__(self, evaluation_root: nn.Module, example: Dict[str, Any]) -> None:
        super().__init__()
        self.evaluation_root, self.example = evaluation_root, example
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self._evaluating else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._evaluating = True
        try:
            proxy.node.meta["value"] = self._evaluate(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - a value that cannot be computed is only a problem if control flow needs it
            proxy.node.meta["value"] = _UNKNOWN
        finally:
            self._evaluating = False
        return proxy

    def _evaluate(self, kind, target, args, kwargs):
        def value(a):
            if isinstance(a, fx.Proxy):
                v = a.node.meta.get("value", _UNKNOWN)
                if v is _UNKNOWN:
                    raise ValueError("unknown")
                return v
            return a
        args, kwargs = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if kind == "placeholder":
            return _example_value(target, self.example)
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.evaluation_root)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.evaluation_root.get_submodule(target)(*args, **kwargs)
        return _UNKNOWN

    def value(self, proxy: fx.Proxy):
        v = proxy.node.meta.get("value", _UNKNOWN)
        if v is _UNKNOWN:
            raise fx.proxy.TraceError("control flow on a value that cannot be computed from the example input")
        return v

    def guard(self, condition: fx.Proxy) -> None:
        self.create_proxy("call_function", torch._assert,
                          (condition, "the converted code was specialised to the shapes of the conversion's images: "
                                      "give inputs of that size"), {})

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value(obj)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise fx.proxy.TraceError("control flow on tensor values")
        decision = bool(value)
        self.guard(obj if decision else self.create_proxy("call_function", operator.not_, (obj,), {}))
        return decision

    def iter(self, obj: fx.Proxy):
        n = len(self.value(obj))
        self.guard(self.create_proxy("call_function", len, (obj,), {}) == n)
        return iter([obj[i] for i in range(n)])

    def concrete(self, obj: fx.Proxy, cast):
        value = cast(self.value(obj))
        self.guard(obj == value)
        return value


_GROUPS = ("_parameters", "_buffers", "_modules")


def _state_of(module: nn.Module) -> Dict[Tuple[str, str], Any]:
    """A module's own attributes, parameters, buffers and children (identities, to detect assignments)."""
    state = {("", k): v for k, v in module.__dict__.items() if k not in _GROUPS}
    for group in _GROUPS:
        state.update({(group, k): v for k, v in module.__dict__[group].items()})
    return state


def _restore_state(module: nn.Module, state: Dict[Tuple[str, str], Any]) -> None:
    for (group, key), value in state.items():
        (module.__dict__[group] if group else module.__dict__)[key] = value


def _example_value(target: str, example: Dict[str, Any]):
    """The example value of a placeholder (``<argument>_<leaf number>`` for leaves of nested arguments)."""
    if target in example:
        return example[target]
    name, _, index = target.rpartition("_")
    if name in example and index.isdigit():
        leaves = pytree.tree_flatten(example[name])[0]
        return leaves[int(index) - 1] if leaves else example[name]
    raise ValueError(target)


def _flat_nodes(args) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _where(path: str, module: nn.Module) -> str:
    return f"{path or '<root>'} ({type(module).__name__})"


class Rewriter:
    """Rewrites a model in place.

    ``make_neuron(signed)``: the neuron in front of a Linear input or a product operand; ``attention``:
    ecm, psa (with ``mask_p``, ``mask_rescale``, ``mask_operands``, ``mask_schedule``, ``mask_fanout``:
    models.attention; ``mask_seed``: the masks' draw, MASK_SEED_STRIDE apart), ssa or
    a2os2a; ``attention_map``: what ecm and psa spike (row_max or softmax, models.attention); ``centre_values``:
    with the softmax map, the value centring (models.attention.ValueCentring);
    ``spike_driven``: every Linear input is a binary IF neuron (Spikingformer); ``norm``: ecm (LayerNorm /
    RMSNorm in expectation) or constant (``ConstantNorm``, calibrated constant statistics); ``fixed_tokens``:
    the token count is the same for every input (per-key thresholds on attention maps are then meaningful)."""

    def __init__(self, make_neuron: Callable[[bool], BaseNeuron], attention: str = "ecm", mask_p: float = 0.0,
                 spike_driven: bool = False, fixed_tokens: bool = True,
                 example: Optional[torch.Tensor] = None, mask_rescale: bool = False, norm: str = "ecm",
                 mask_operands: Tuple[str, ...] = MASK_OPERANDS, mask_schedule: str = "random",
                 centre_values: bool = False, attention_map: str = "row_max", mask_fanout: bool = False,
                 mask_seed: int = 0) -> None:
        self.make_neuron = make_neuron
        self.centre_values, self.attention_map = centre_values, attention_map
        self.norm = norm
        self.attention, self.mask_p, self.spike_driven = attention, mask_p, spike_driven
        self.mask_rescale, self.mask_operands, self.mask_schedule = mask_rescale, mask_operands, mask_schedule
        self.mask_fanout, self.mask_seed = mask_fanout, mask_seed
        self.fixed_tokens = fixed_tokens
        self.example = example
        self.first_layers: Set[str] = set()
        self.specialised: List[str] = []  # modules whose shape-dependent control flow was fixed to the example's
        self.attention_count = 0
        self._seen: Dict[int, str] = {}
        self._calls: Dict[int, Tuple[tuple, dict]] = {}  # first call of each module (as meta tensors)
        self._call_counts: Dict[int, int] = {}
        self._pristine: Dict[int, nn.Module] = {}  # copies of modules called more than once, before conversion
        self.originals: Dict[int, nn.Module] = {}  # replacement module -> the module it replaced

    # --- neurons ---------------------------------------------------------------------------------------
    def input_neuron(self, signed: bool = True, binary: bool = False, channel_axis: int = -1) -> BaseNeuron:
        """The neuron in front of a Linear / Conv layer."""
        neuron = IFNeuron(1) if self.spike_driven or binary else self.make_neuron(signed)
        neuron.channel_axis = channel_axis
        return neuron

    def operand_neuron(self, signed: bool) -> BaseNeuron:
        """The neuron on an operand of a product of two streams (its last axis may be a token axis)."""
        neuron = self.make_neuron(signed)
        neuron.channelwise = self.fixed_tokens
        return neuron

    # --- modules -----------------------------------------------------------------------------------------
    def convert_root(self, model: nn.Module) -> nn.Module:
        """Rewrite ``model``: its first ``forward`` argument is the image, every other takes its default."""
        params = list(inspect.signature(model.forward).parameters.values())
        if not params:
            raise UnsupportedModuleError(f"{_where('', model)}: forward takes no input")
        concrete = {p.name: p.default for p in params[1:]
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        missing = [n for n, v in concrete.items() if v is inspect.Parameter.empty]
        if missing:
            raise UnsupportedModuleError(f"{_where('', model)}: forward needs more than the image "
                                         f"({', '.join(missing)} have no default)")
        if self.example is not None:
            self._capture(model)
        self._rewrite(model, "", {params[0].name: Kind.IMAGE}, {}, concrete)
        return model

    def _capture(self, model: nn.Module) -> None:
        """Run the model once on the example, recording every module's first call (as meta tensors: shapes
        for value tracing, no memory) and how often each module is called."""
        def to_meta(v):
            return v.detach().to("meta") if isinstance(v, torch.Tensor) else v

        def hook(module, args, kwargs):
            self._call_counts[id(module)] = self._call_counts.get(id(module), 0) + 1
            if id(module) not in self._calls:
                self._calls[id(module)] = (pytree.tree_map(to_meta, args), pytree.tree_map(to_meta, kwargs))

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
        try:
            with torch.no_grad():
                model(self.example)
        except Exception:  # noqa: BLE001 - without the record, shape-dependent code is refused by name
            self._calls.clear()
        finally:
            for h in handles:
                h.remove()

    def _claim(self, module: nn.Module, path: str) -> None:
        if id(module) in self._seen:
            raise UnsupportedModuleError(
                f"{_where(path, module)} is called on activations more than once per forward pass (also as "
                f"{self._seen[id(module)] or '<root>'}): each call needs its own spiking state")
        self._seen[id(module)] = path
        if self._call_counts.get(id(module), 1) > 1:
            self._pristine[id(module)] = copy.deepcopy(module)

    def fresh_copy(self, module: nn.Module, path: str) -> Optional[nn.Module]:
        """For a module already converted at another call: an unconverted copy with the same weights (its
        own spiking state; the weights are no longer tied), or None on a first call."""
        if id(module) not in self._seen:
            return None
        pristine = self._pristine.get(id(module))
        if pristine is None:
            self._claim(module, path)  # raises: a module called more often than the example showed
        clone = copy.deepcopy(pristine)
        self._call_counts[id(clone)] = 1
        if id(module) in self._calls:
            self._calls[id(clone)] = self._calls[id(module)]
        return clone

    def _trace(self, module: nn.Module, path: str, concrete: Dict[str, Any]) -> fx.Graph:
        """Symbolic tracing; where control flow depends on shapes, tracing with values from the recorded
        example call, specialised to its shapes (guarded by assertions). A forward that assigns to its
        module's own attributes (a cache, a counter) is refused: its state would not follow the simulation."""
        before = _state_of(module)
        try:
            return self._trace_once(module, path, concrete)
        finally:
            after = _state_of(module)
            changed = [k for k, v in before.items() if after.get(k, _UNKNOWN) is not v]
            if changed:
                _restore_state(module, before)
                raise UnsupportedModuleError(f"{_where(path, module)} assigns to its own attribute(s) "
                                             f"{', '.join(k for _, k in changed)} in forward: state kept by a module "
                                             f"across calls "
                                             f"cannot be converted (make it a buffer computed in __init__)")

    def _trace_once(self, module: nn.Module, path: str, concrete: Dict[str, Any]) -> fx.Graph:
        try:
            return _Tracer().trace(module, concrete_args=concrete)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported with the module's path
            first = exc
        call = self._calls.get(id(module))
        if call is not None:
            args, kwargs = call
            try:
                example = inspect.signature(module.forward).bind(*args, **kwargs)
                example.apply_defaults()
                evaluation_root = copy.deepcopy(module).to("meta")
                graph = _ValueTracer(evaluation_root, dict(example.arguments)).trace(module, concrete_args=concrete)
                self.specialised.append(path)
                return graph
            except Exception as exc:  # noqa: BLE001
                first = exc
        reason = " ".join(str(first).split())[:200]
        raise UnsupportedModuleError(f"{_where(path, module)} cannot be traced ({type(first).__name__}: {reason}): "
                                     f"control flow that depends on the data, or Python the tracer cannot follow"
                                     ) from None

    def _rewrite(self, module: nn.Module, path: str, params: Dict[str, Any], containers: Dict[str, list],
                 concrete: Dict[str, Any]):
        """Trace ``module.forward`` with ``concrete`` arguments fixed, rewrite its graph, install it.

        ``params``: kinds of the tensor arguments; ``containers``: for arguments that nest tensors in
        tuples or lists, the kind of each leaf (None for constants) in pytree order.
        Returns the kind of its output (a structure of kinds for tuple outputs)."""
        self._claim(module, path)
        graph = self._trace(module, path, concrete)
        kinds: Dict[fx.Node, Any] = {}
        state = _GraphState(self, module, path, graph, kinds)
        out_kind: Any = Kind.CONST
        for node in list(graph.nodes):
            if node.op == "placeholder":
                kind = _placeholder_kind(node.target, params, containers)
                if kind is None:
                    state.drop_specialised(node)
                else:
                    kinds[node] = kind
            elif node.op == "get_attr":
                kinds[node] = Kind.CONST
            elif node.op == "output":
                out_kind = fx.node.map_aggregate(node.args[0], lambda a: kinds.get(a, Kind.CONST)
                                                 if isinstance(a, fx.Node) else Kind.CONST)
            else:
                state.convert(node)
        state.finish()
        out_spec = _install(module, graph, inspect.signature(module.forward))
        return out_kind if out_spec is None else pytree.tree_unflatten(list(out_kind), out_spec)

    def call_submodule(self, sub: nn.Module, path: str, node: fx.Node, kinds: Dict[fx.Node, Any]):
        """A call of a submodule on streams: replaced through the registry, or traced and rewritten."""
        try:
            bound = inspect.signature(sub.forward).bind(*node.args, **node.kwargs)
        except TypeError as exc:
            raise UnsupportedModuleError(f"{_where(path, sub)}: cannot bind its call ({exc})") from None
        params: Dict[str, Any] = {}
        containers: Dict[str, list] = {}
        concrete: Dict[str, Any] = {}
        sig = inspect.signature(sub.forward)
        for name, value in bound.arguments.items():
            if sig.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                if _flat_nodes(value):
                    raise UnsupportedModuleError(f"{_where(path, sub)}: tensors passed through *args / **kwargs")
                continue
            if isinstance(value, fx.Node):
                params[name] = kinds.get(value, Kind.CONST)
                continue
            leaves, spec = pytree.tree_flatten(value)
            if any(isinstance(leaf, fx.Node) for leaf in leaves):  # a tuple / list of tensors: one placeholder each
                containers[name] = [kinds.get(leaf, Kind.CONST) if isinstance(leaf, fx.Node) else None
                                    for leaf in leaves]
                value = pytree.tree_unflatten([PH if isinstance(leaf, fx.Node) else leaf for leaf in leaves], spec)
            concrete[name] = value
        for name, p in sig.parameters.items():
            if name not in bound.arguments and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                concrete[name] = p.default
        return self._rewrite(sub, path, params, containers, concrete)


class _GraphState:
    """The rewrite of one traced graph: kinds of its values, and the nodes replaced so far."""

    def __init__(self, rw: Rewriter, module: nn.Module, path: str, graph: fx.Graph, kinds: Dict[fx.Node, Any]):
        self.rw, self.module, self.path, self.graph, self.kinds = rw, module, path, graph, kinds
        self.pending_relu: Set[fx.Node] = set()  # ReLUs that become the neuron of the layer using them
        self.binary_sources: Set[fx.Node] = set()  # outputs of ssa attention: the next layer's neuron is binary IF
        self.nonnegative: Set[fx.Node] = set()
        self.moved: Dict[str, Optional[str]] = {}  # replaced submodules: old path -> where the original now lives

    # --- helpers -------------------------------------------------------------------------------------------
    def kind(self, value) -> Kind:
        found = [self.kinds.get(n, Kind.CONST) for n in _flat_nodes(value)]
        return max((_max_kind(k) for k in found), default=Kind.CONST)

    def where(self) -> str:
        return _where(self.path, self.module)

    def fail(self, node: fx.Node, why: str) -> None:
        raise UnsupportedModuleError(f"{self.where()}: {why} ({ops.describe(node.op, node.target)} at node "
                                     f"{node.name})")

    def drop_specialised(self, placeholder: fx.Node) -> None:
        """A placeholder fixed by a concrete argument: its only users are the tracer's assertions of its value."""
        chain, todo = [], [placeholder]
        while todo:
            node = todo.pop()
            if node is not placeholder and node.target not in _ASSERTIONS:
                self.fail(node, f"argument {placeholder.target} is used although its value was fixed")
            chain.append(node)
            todo.extend(node.users)
        while chain:
            node = next(n for n in chain if not n.users)
            chain.remove(node)
            self.graph.erase_node(node)

    def add(self, name: str, module: nn.Module) -> str:
        """Attach ``module`` to the traced module under a free attribute name; returns the name."""
        base = name.replace(".", "_")
        name, i = base, 1
        while hasattr(self.module, name):
            i += 1
            name = f"{base}_{i}"
        self.module.add_module(name, module)
        return name

    def replace(self, node: fx.Node, name_hint: str, module: nn.Module, args=None, kwargs=None) -> fx.Node:
        """Replace ``node`` by a call of ``module`` (by default with the node's own arguments)."""
        name = self.add(name_hint, module)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(name, node.args if args is None else args,
                                         node.kwargs if kwargs is None else kwargs)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.kinds[new] = Kind.STREAM
        return new

    def is_nonnegative(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.nonnegative

    def set_submodule(self, target: str, new: nn.Module, inner: Optional[str]) -> None:
        """Replace the submodule at ``target`` by ``new``, which holds it as ``new.<inner>`` (None: not at all)."""
        parent, _, attr = target.rpartition(".")
        owner = self.module.get_submodule(parent) if parent else self.module
        self.rw.originals[id(new)] = getattr(owner, attr)
        setattr(owner, attr, new)
        self.moved[target] = None if inner is None else f"{target}.{inner}"

    # --- the rewrite of one call node ------------------------------------------------------------------------
    def convert(self, node: fx.Node) -> None:
        if not self.kind((node.args, node.kwargs)):
            self.kinds[node] = Kind.CONST
            return
        op, target = node.op, node.target
        if op == "call_module":
            self.kinds[node] = self.convert_module_call(node, target)
            return
        key = target
        if op == "call_function" and target is getattr:
            attr = node.args[1]
            if attr in ops.SHAPE_ATTRIBUTES:
                self.kinds[node] = Kind.CONST
            elif attr in ops.LINEAR_ATTRIBUTES:
                self.linear(node)
            else:
                self.fail(node, f"attribute {attr!r} of an activation stream")
            return
        if (op == "call_method" and target in ops.SHAPE_METHODS) or \
                (op == "call_function" and target in ops.SHAPE_FUNCTIONS):
            self.kinds[node] = Kind.CONST
            return
        if op == "call_function" and target is operator.getitem:
            self.getitem(node)
            return
        if op == "call_function" and target is operator.setitem:
            self.setitem(node)
            return
        if key in ops.ATTENTION:
            self.attention(node)
            return
        if key in ops.LAYERS:
            self.layer(node)
            return
        rule = ops.CONDITIONAL.get(key)
        if rule is not None:
            self.conditional(node, rule)
            return
        if (op == "call_function" and key in ops.LINEAR_FUNCTIONS) or (op == "call_method" and key in ops.LINEAR_METHODS):
            if key in ("masked_fill", "masked_fill_") and self.kind(node.args[1]):
                self.fail(node, "a mask computed from the activations")
            self.linear(node)
            return
        if (op == "call_function" and key in ops.NONLINEAR_FUNCTIONS) or \
                (op == "call_method" and key in ops.NONLINEAR_METHODS):
            self.nonlinear(node)
            return
        self.fail(node, "an operation on activations that the converter does not know (neither linear, a product "
                        "nor a known stateless function)")

    def convert_module_call(self, node: fx.Node, target: str):
        sub = self.module.get_submodule(target)
        sub = self.rw.originals.get(id(sub), sub)
        path = _join(self.path, target)
        clone = self.rw.fresh_copy(sub, path)
        if clone is not None:  # a module called again (shared weights): this call gets its own copy
            target = self.add(f"{target}_call", clone)
            node.target, sub, path = target, clone, _join(self.path, target)
        kind = self.kind((node.args, node.kwargs))
        cls = type(sub)
        if cls in LINEAR_LAYERS:
            self.rw._claim(sub, path)
            if kind == Kind.IMAGE:
                self.rw.first_layers.add(path)
                return Kind.STREAM
            x = node.args[0]
            signed, binary = self.neuron_choice(x)
            if x in self.pending_relu:
                node.args = (x.args[0],) + tuple(node.args[1:])
                self.graph.erase_node(x)
            channel_axis = 1 if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
            self.set_submodule(target, SpikingSynapse(self.rw.input_neuron(signed, binary, channel_axis), sub), "layer")
            return Kind.STREAM
        if cls in CONVERTERS:
            self.rw._claim(sub, path)
            if cls is nn.ReLU and self.relu_feeds_one_layer(node):
                return Kind.STREAM
            if cls in (nn.Softmax, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.Hardsigmoid):
                self.nonnegative.add(node)
            new = CONVERTERS[cls](self.rw, sub, path)
            inner = next((n for n, m in new.named_modules() if m is sub), None)
            self.set_submodule(target, new, inner)
            return Kind.STREAM
        if cls in AFFINE_MODULES:
            return kind
        return self.rw.call_submodule(sub, path, node, self.kinds)

    def neuron_choice(self, x: Any) -> Tuple[bool, bool]:
        """(signed, binary) for the neuron in front of a layer whose input is ``x``."""
        if x in self.pending_relu:
            return False, False
        return not self.is_nonnegative(x), isinstance(x, fx.Node) and x in self.binary_sources

    def relu_feeds_one_layer(self, node: fx.Node) -> bool:
        """A ReLU whose only use is the input of a Linear / Conv: it becomes that layer's IF neuron."""
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        if not user.args or user.args[0] is not node:
            return False
        is_layer = (user.op == "call_module" and type(self.module.get_submodule(user.target)) in LINEAR_LAYERS) or \
            (user.op == "call_function" and user.target in ops.LAYERS)
        if is_layer:
            self.pending_relu.add(node)
        return is_layer

    def linear(self, node: fx.Node) -> None:
        stream_inputs = [n for n in _flat_nodes((node.args, node.kwargs)) if self.kind(n)]
        self.kinds[node] = max(self.kind(n) for n in stream_inputs)
        if all(n in self.binary_sources for n in stream_inputs):
            self.binary_sources.add(node)
        if all(n in self.nonnegative for n in stream_inputs) and node.target not in ("sub", operator.sub, operator.neg,
                                                                                    "neg", torch.sub, torch.neg):
            self.nonnegative.add(node)
        if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
            self.kinds[node.args[0]] = max(_max_kind(self.kinds.get(node.args[0], Kind.CONST)), self.kinds[node])

    def getitem(self, node: fx.Node) -> None:
        src, index = node.args
        if self.kind(index):
            self.fail(node, "indexing with indices computed from the activations")
        kind = self.kinds.get(src, Kind.CONST)
        if isinstance(kind, tuple) and isinstance(index, int):
            self.kinds[node] = kind[index]
        else:
            self.kinds[node] = _max_kind(kind)
        if src in self.binary_sources:
            self.binary_sources.add(node)
        if src in self.nonnegative:
            self.nonnegative.add(node)

    def setitem(self, node: fx.Node) -> None:
        target, index, value = node.args
        if self.kind(index):
            self.fail(node, "indexing with indices computed from the activations")
        self.kinds[node] = Kind.CONST
        self.kinds[target] = max(_max_kind(self.kinds.get(target, Kind.CONST)), self.kind(value))

    def conditional(self, node: fx.Node, rule: str) -> None:
        args = list(node.args)
        if rule == "one_stream":
            operands = args[1:] if node.target is torch.einsum else args[:2]
            if sum(bool(self.kind(a)) for a in operands) <= 1:
                self.linear(node)
            else:
                self.product(node, operands)
        elif rule == "numerator":
            if self.kind(args[1:]) or self.kind(node.kwargs):
                self.nonlinear(node)
            else:
                self.linear(node)
        elif rule == "not_condition":
            if self.kind(args[0]):
                self.fail(node, "a selection by a condition computed from the activations")
            self.linear(node)

    def layer(self, node: fx.Node) -> None:
        x, *rest = node.args
        if self.kind(rest) or self.kind(node.kwargs):
            self.fail(node, "a Linear / Conv whose weights are computed from the activations")
        if self.kinds.get(x) == Kind.IMAGE:
            self.kinds[node] = Kind.STREAM
            return
        signed, binary = self.neuron_choice(x)
        if x in self.pending_relu:
            node.args = (x.args[0],) + tuple(rest)
            self.graph.erase_node(x)
        axis = -1 if node.target is F.linear else 1
        self.replace(node, node.name, SpikingSynapse(self.rw.input_neuron(signed, binary, axis), node.target))

    def product(self, node: fx.Node, operands: list) -> None:
        if node.target is torch.einsum:
            op = functools.partial(torch.einsum, node.args[0])
        elif node.target in (operator.mul, torch.mul, torch.multiply, "mul", "mul_", operator.imul):
            op = torch.mul
        else:
            op = torch.matmul
        if len(node.args) != len(operands) + (node.target is torch.einsum) or node.kwargs:
            self.fail(node, "a product with extra arguments")
        a, b = operands
        neurons = [self.rw.operand_neuron(not self.is_nonnegative(x)) for x in (a, b)]
        self.replace(node, f"{node.name}_product", SpikingProduct(*neurons, SpikeProduct(op)), args=(a, b), kwargs={})

    def nonlinear(self, node: fx.Node) -> None:
        streams = [i for i, a in enumerate(node.args) if self.kind(a)]
        if any(self.kind(v) for v in node.kwargs.values()) or any(not isinstance(node.args[i], fx.Node) for i in streams):
            self.fail(node, "a non-linear function of activations passed by keyword or inside a container")
        if ops.is_relu(node.op, node.target) and self.relu_feeds_one_layer(node):
            self.kinds[node] = Kind.STREAM
            return
        fn = Method(node.target.rstrip("_")) if node.op == "call_method" else node.target
        if node.target in ("max", "min", torch.max, torch.min) and (len(node.args) > 1 or "dim" in node.kwargs):
            self.values_only(node, fn, streams)
            return
        nonnegative = node.target in ops.NONNEGATIVE
        new = self.replace(node, f"{node.name}_ecm", ExpectationCompensation(fn, streams))
        if nonnegative:
            self.nonnegative.add(new)

    def values_only(self, node: fx.Node, fn: Callable, streams: List[int]) -> None:
        """max / min along a dimension return (values, indices): the values are computed in expectation; the
        indices of a maximum of activations are not a function the converter can make spiking."""
        uses = list(node.users)
        if not all((u.target is operator.getitem and u.args[1] == 0) or
                   (u.target is getattr and u.args[1] == "values") for u in uses):
            self.fail(node, "the indices of a maximum or minimum of activations are used")
        new = self.replace(node, f"{node.name}_ecm", ExpectationCompensation(_Values(fn), streams))
        for use in uses:
            use.replace_all_uses_with(new)
            self.graph.erase_node(use)

    def attention(self, node: fx.Node) -> None:
        q, k, v = (tuple(node.args) + (None,) * 3)[:3]
        rw = self.rw
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        if rw.attention in ("ssa", "a2os2a") and (mask is not None or causal):
            self.fail(node, f"attention={rw.attention} has no softmax to take this attention's mask (relative "
                            f"position bias, shifted windows or a causal mask): use attention=ecm or psa here")
        rw.attention_count += 1  # each attention core draws its own psa masks
        seed = 3 * rw.attention_count + MASK_SEED_STRIDE * rw.mask_seed
        core = SpikingSDPA(rw.attention, rw.make_neuron, fixed_tokens=rw.fixed_tokens, mask_p=rw.mask_p,
                           seed=seed, constant=tuple(not self.kind(x) for x in (q, k, v)),
                           mask_rescale=rw.mask_rescale, mask_operands=rw.mask_operands,
                           mask_schedule=rw.mask_schedule, centre_values=rw.centre_values,
                           attention_map=rw.attention_map, mask_fanout=rw.mask_fanout)
        new = self.replace(node, "attend", core)
        if rw.attention == "ssa":
            self.binary_sources.add(new)

    def finish(self) -> None:
        """Reads of a replaced module's parameters (``self.fc.weight`` in code that also calls ``self.fc``) follow
        the module to its place inside the replacement."""
        for node in self.graph.nodes:
            if node.op == "get_attr":
                for old, new in self.moved.items():
                    if node.target.startswith(old + "."):
                        if new is None:
                            self.fail(node, f"a parameter of {old}, which the converter replaced as a whole")
                        node.target = new + node.target[len(old):]
        self.graph.lint()


class _Values:
    """``fn(...).values`` for functions that return (values, indices)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)[0]

    def __repr__(self) -> str:
        return f"{self.fn!r}.values"


_ASSERTIONS = (fx._symbolic_trace._assert_is_none, torch._assert, operator.eq)


def _max_kind(kind) -> Kind:
    if isinstance(kind, (tuple, list)):
        return max((_max_kind(k) for k in kind), default=Kind.CONST)
    return kind


def _placeholder_kind(target: str, params: Dict[str, Any], containers: Dict[str, list]):
    """The kind of a traced argument; None for one fixed to a constant. Arguments nesting tensors are traced
    as one placeholder per leaf, named ``<argument>_<leaf number from 1>``."""
    if target in params:
        return params[target]
    name, _, index = target.rpartition("_")
    if name in containers and index.isdigit():
        return containers[name][int(index) - 1]
    return None


def _accessor(target: str, signature: inspect.Signature) -> Callable[[inspect.BoundArguments], Any]:
    """How to find a placeholder's value among the arguments of a call."""
    if target in signature.parameters:
        return lambda bound: bound.arguments.get(target)
    name, _, index = target.rpartition("_")
    i = int(index) - 1
    return lambda bound: pytree.tree_flatten(bound.arguments[name])[0][i]


def _install(module: nn.Module, graph: fx.Graph, signature: inspect.Signature):
    """Make ``module`` run ``graph``: a subclass of its class (same name) whose forward binds the original
    signature and passes the traced tensor arguments to the graph's code. Returns the output's pytree
    spec when the graph returns a flattened structure (else None)."""
    info = getattr(graph._codegen, "pytree_info", None)
    out_spec = info.out_spec if info is not None else None
    graph.set_codegen(fx.graph.CodeGen())  # plain positional placeholders; structures handled here
    code = graph.python_code(root_module="self")
    run = fx.graph_module._forward_from_src(code.src, code.globals)
    getters = [_accessor(n.target, signature) for n in graph.nodes if n.op == "placeholder"]

    def forward(self, *args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        out = run(self, *(get(bound) for get in getters))
        return out if out_spec is None else pytree.tree_unflatten(list(out), out_spec)

    cls = type(module)
    base = getattr(cls, "_original_class", cls)
    module.__class__ = type(base.__name__, (base,), {"forward": forward, "graph": graph, "_original_class": base,
                                                    "__module__": base.__module__})
    return out_spec


def rewrite(model: nn.Module, make_neuron: Callable[[bool], BaseNeuron], **variant) -> nn.Module:
    """Rewrite ``model`` in place into its spiking counterpart and return it (``variant``: see Rewriter)."""
    return Rewriter(make_neuron, **variant).convert_root(model)
