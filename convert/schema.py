"""One schema of valid values for every configuration key, checked before any expensive work.

The CLI checks the composed config (``validate_config``), every multirun job is checked before the
first one starts, and the Python API (``convert``, ``finetune``) checks its keyword options against the
same rules (``validate_options``), so a bad value gets the same one-line message everywhere. Each key
has exactly one rule; ``missing_rules`` lists config keys without one (a test keeps it empty), and
RELIABILITY.md's table of keys is generated from these rules (``markdown()``).
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

MAX_LEVELS = 1024  # more levels per step than this is an analog neuron: alphabet and calibration stay bounded
MAX_MULTI_THRESHOLD_LEVELS = 30
MAX_TIMESTEPS = 65536
MAX_MASK_SEED = 2 ** 40  # times models.attention.MASK_SEED_STRIDE (2^20): within torch's 64-bit seeds
MAX_HYSTERESIS = 8.0  # the mean's error bound grows as (1/2 + s) theta / t: beyond this the code is useless
DEVICES = "auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Key:
    """The rule of one config key: its type, range or choices, and the keyword it has in the Python API."""
    path: str
    kind: str  # int, float, bool, choice, str, path, device, variants
    doc: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    nullable: bool = False
    choices: Tuple[str, ...] = ()
    api: Optional[str] = None  # keyword of convert() (or finetune(), for finetune.* keys)

    def describe(self) -> str:
        """What a valid value is, in words."""
        if self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind in ("int", "float"):
            text = ("an integer" if self.kind == "int" else "a finite number") + self._range()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "path":
            text = "an existing path"
        elif self.kind == "device":
            text = DEVICES
        elif self.kind == "variants":
            text = "a mapping of variant names to convert options"
        else:
            text = "a non-empty string"
        return text + (" or null" if self.nullable else "")

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            if self.kind == "int" and not (self.low_open or self.high_open):
                return f" in {_fmt(self.low)}..{_fmt(self.high)}"
            return f" in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return ""

    def check(self, value: Any) -> None:
        """ValueError with one line naming the key, the valid values and the value given."""
        if value is None:
            if self.nullable:
                return
            raise ValueError(f"{self.path} must be {self.describe()}, got null")
        ok = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
              "choice": lambda v: isinstance(v, str) and v in self.choices,
              "str": lambda v: isinstance(v, str) and v.strip() != "", "path": _is_existing_path,
              "device": _is_device, "variants": _is_variants}[self.kind](value)
        if ok and self.kind in ("int", "float"):
            ok = self._in_range(float(value))
        if not ok:
            if self.kind == "choice":
                raise ValueError(f"unknown {self.path} {value!r}: use one of {', '.join(self.choices)}")
            if self.kind == "path":
                raise FileNotFoundError(f"{self.path}: {value} does not exist (give {self.doc})")
            raise ValueError(f"{self.path} must be {self.describe()}, got {value!r}")

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_existing_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and str(v).strip() != "" and Path(v).expanduser().exists()


def _is_variants(v) -> bool:
    if isinstance(v, DictConfig):
        v = OmegaConf.to_container(v)
    return isinstance(v, dict) and all(isinstance(o, dict) for o in v.values())


def _is_device(v) -> bool:
    if not isinstance(v, str):
        return False
    if v in ("auto", "cpu", "cuda"):
        return True
    return v.startswith("cuda:") and v[5:].isdigit()


def _choices() -> Dict[str, Tuple[str, ...]]:
    from calibration import CORRECTIONS, METHODS
    from convert.api import ATTENTION_VARIANTS, NORM_STYLES, RESIDUAL_STYLES
    from models.attention import ATTENTION_MAPS, MASK_OPERANDS, MASK_SCHEDULES
    from models.neurons import CODINGS, NEURONS, Surrogate
    return {"neuron": tuple(NEURONS), "coding": CODINGS, "method": tuple(METHODS), "correction": tuple(CORRECTIONS),
            "attention": tuple(ATTENTION_VARIANTS), "residual": tuple(RESIDUAL_STYLES),
            "norm": NORM_STYLES, "mask_schedule": MASK_SCHEDULES, "attention_map": ATTENTION_MAPS,
            "mask_operands": tuple("+".join(c) for n in (3, 2, 1) for c in itertools.combinations(MASK_OPERANDS, n)),
            "surrogate": tuple(Surrogate.KINDS)}


def keys() -> List[Key]:
    """Every configuration key's rule."""
    c = _choices()
    return [
        Key("model.name", "str", "timm model name, alias or vit_fmnist (checked against timm's registry)"),
        Key("model.checkpoint", "path", "ANN weights to convert (.safetensors or a torch state dict)", nullable=True),
        Key("model.pretrained", "bool", "use timm's pretrained weights"),
        Key("data.name", "choice", "data set", choices=("fashion_mnist", "imagenet", "cifar10", "cifar100")),
        Key("data.root", "path", "the data folder: Fashion-MNIST IDX files or an ImageFolder root", nullable=True),
        Key("data.download", "bool", "download the data set when online"),
        Key("data.batch_size", "int", "evaluation batch size", low=1, high=1 << 20),
        Key("data.eval_images", "int", "evaluation images (null: all)", low=1, nullable=True),
        Key("neuron.name", "choice", "neuron type", choices=c["neuron"], api="neuron"),
        Key("neuron.levels", "int", "largest level L a neuron emits per step", low=1, high=MAX_LEVELS, api="levels"),
        Key("neuron.v_init", "float", "initial membrane in units of the threshold", low=0, high=1, api="v_init"),
        Key("neuron.coding", "choice", "rate: send k every step; differential: send only k(t) - k(t-1)",
            choices=c["coding"], api="coding"),
        Key("neuron.hysteresis", "float", "differential: keep the level while the membrane is within this of "
            "its range (0: outputs of rate coding)", low=0, high=MAX_HYSTERESIS, api="hysteresis"),
        Key("calibration.method", "choice", "threshold method", choices=c["method"], api="calibration"),
        Key("calibration.percentile", "float", "percentile for method=percentile", low=0, high=100, low_open=True,
            api="percentile"),
        Key("calibration.per_channel", "bool", "one threshold per channel", api="per_channel"),
        Key("calibration.per_token", "bool", "own thresholds for class / register tokens", api="per_token"),
        Key("calibration.input_offsets", "bool", "unsigned neurons before Linear layers (spike_driven) keep "
            "negative inputs down to a calibrated offset", api="input_offsets"),
        Key("calibration.correction", "choice", "correction after thresholds", choices=c["correction"],
            api="correction"),
        Key("calibration.num_images", "int", "calibration images", low=1, api="num_images"),
        Key("attention.name", "choice", "attention variant", choices=c["attention"], api="attention"),
        Key("attention.mask_p", "float", "share of spikes masked by psa", low=0, high=1, high_open=True, api="mask_p"),
        Key("attention.mask_rescale", "bool", "psa: divide the masked products by 1 - mask_p (unbiased)",
            api="mask_rescale"),
        Key("attention.mask_operands", "choice", "psa: which of Q, K and the attention map are masked",
            choices=c["mask_operands"], api="mask_operands"),
        Key("attention.mask_schedule", "choice", "psa: random (Bernoulli at every step, EST) or even (each element "
            "dropped at an evenly spaced share mask_p of the steps)", choices=c["mask_schedule"],
            api="mask_schedule"),
        Key("attention.mask_fanout", "bool", "psa: a mask skips only its spikes' fan-out into the product; the "
            "product's running sums keep every spike", api="mask_fanout"),
        Key("attention.mask_seed", "int", "psa: which draw of the masks (each attention core draws its own)",
            low=0, high=MAX_MASK_SEED, api="mask_seed"),
        Key("attention.map", "choice", "ecm, psa: the attention map the neuron spikes: row_max, exp(s - max_k s) "
            "(each row peaks at 1), normalised after A V by its spiked row sums; softmax, the probabilities",
            choices=c["attention_map"], api="attention_map"),
        Key("attention.centre_values", "bool", "ecm, psa with map=softmax: A V as A (V - mean V) + mean V, so the "
            "attention map's rounding loses no mass", api="centre_values"),
        Key("attention.residual", "choice", "residual style", choices=c["residual"], api="residual"),
        Key("attention.norm", "choice", "ecm: LayerNorm / RMSNorm in expectation; constant: calibrated constant "
            "statistics (a per-channel affine map, no per-token reduction)", choices=c["norm"], api="norm"),
        Key("finetune.epochs", "int", "fine-tuning epochs (0: training-free)", low=0, high=100000),
        Key("finetune.lr", "float", "learning rate of the weights (null: 5e-3 x the share of the first 256 training "
            "images on which the SNN's top-1 differs from the ANN's, within [1e-4, 1e-3])", low=0,
            low_open=True, high=10, nullable=True, api="lr"),
        Key("finetune.threshold_lr", "float", "learning rate of the thresholds (null: lr)", low=0, low_open=True,
            high=10, nullable=True, api="threshold_lr"),
        Key("finetune.weight_decay", "float", "AdamW weight decay", low=0, high=10, api="weight_decay"),
        Key("finetune.warmup", "float", "share of the steps spent warming up", low=0, high=1, high_open=True,
            api="warmup"),
        Key("finetune.batch_size", "int", "training batch size", low=1, high=1 << 20, api="batch_size"),
        Key("finetune.timesteps", "int", "T while training (null: the run's)", low=1, high=MAX_TIMESTEPS,
            nullable=True, api="timesteps"),
        Key("finetune.images", "int", "training images per epoch (null: all)", low=1, nullable=True, api="images"),
        Key("finetune.surrogate", "choice", "surrogate gradient", choices=c["surrogate"], api="surrogate"),
        Key("finetune.alpha", "float", "sharpness of the sigmoid surrogate", low=0, low_open=True, high=1e4,
            api="alpha"),
        Key("finetune.thresholds", "bool", "learn the thresholds", api="thresholds"),
        Key("finetune.weights", "bool", "learn the weights", api="weights"),
        Key("finetune.distill", "float", "weight of the distillation term", low=0, high=1, api="distill"),
        Key("finetune.temperature", "float", "distillation temperature", low=0, low_open=True, high=1e4,
            api="temperature"),
        Key("finetune.event_penalty", "float", "weight of the events per neuron per step in the loss", low=0,
            high=1e4, api="event_penalty"),
        Key("finetune.blend", "float", "share of the steps over which the network moves from the ANN to the SNN",
            low=0, high=1, api="blend"),
        Key("finetune.feature_distill", "float", "weight of the block-output distillation term", low=0, high=1e4,
            api="feature_distill"),
        Key("finetune.grad_checkpoint", "bool", "recompute blocks in the backward pass", api="grad_checkpoint"),
        Key("finetune.checkpoint_every", "int", "steps between checkpoints (0: at the end)", low=0,
            api="checkpoint_every"),
        Key("finetune.resume", "path", "a finetune.safetensors to continue", nullable=True, api="resume"),
        Key("finetune.max_steps", "int", "stop after this many steps (null: all)", low=1, nullable=True,
            api="max_steps"),
        Key("sweep.name", "str", "name of the sweep"),
        Key("sweep.variants", "variants", "variants to compare", nullable=True),
        Key("sweep.energy_images", "int", "images for the energy report", low=1, high=1 << 20),
        Key("launcher.name", "choice", "multirun launcher", choices=("basic", "submitit_local", "submitit_slurm")),
        Key("timesteps", "int", "T: steps simulated", low=1, high=MAX_TIMESTEPS),
        Key("step_mode", "choice", "step (s) or multi-step (m) simulation", choices=("s", "m"), api="step_mode"),
        Key("chunk", "int", "multi-step mode: steps per call (null: all T)", low=1, high=MAX_TIMESTEPS, nullable=True,
            api="chunk"),
        Key("compile", "bool", "simulate through torch.compile (faster on GPUs, compiled at the first simulation)",
            api="compile"),
        Key("device", "device", "where to run"),
        Key("seed", "int", "random seed", low=0, high=2 ** 63 - 1),
        Key("out", "str", "output folder (null: runs/<date>_<time>_<model>)", nullable=True),
        Key("progress", "bool", "progress bars on stderr (null: when stderr is a terminal)", nullable=True,
            api="progress"),
    ]


KEYS: Dict[str, Key] = {}


def keys_by_path() -> Dict[str, Key]:
    if not KEYS:
        KEYS.update({k.path: k for k in keys()})
    return KEYS


def _leaves(cfg: DictConfig, prefix: str = "") -> Iterable[Tuple[str, Any]]:
    for name in cfg:
        path = f"{prefix}{name}"
        value = cfg[name] if not OmegaConf.is_missing(cfg, name) else None
        if isinstance(value, DictConfig) and path != "sweep.variants":
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def missing_rules(cfg: DictConfig) -> List[str]:
    """Config keys without a rule (a test keeps this empty)."""
    return [path for path, _ in _leaves(cfg) if path not in keys_by_path()]


# --- cross-key rules --------------------------------------------------------------------------------------

FIXED_ALPHABET = {"ssa": "binary Q, K, V", "a2os2a": "binary Q and ternary V",
                  "spike_driven": "binary inputs to every Linear layer"}


def check_combination(o: Dict[str, Any]) -> None:
    """Rules across keys, on convert()'s option names."""
    if o["neuron"] == "multi_threshold" and o["levels"] > MAX_MULTI_THRESHOLD_LEVELS:
        raise ValueError(f"neuron.levels must be in 1..{MAX_MULTI_THRESHOLD_LEVELS} for neuron=multi_threshold "
                         f"(levels 2^0 .. 2^(N-1)), got {o['levels']}")
    if o["neuron"] == "ternary" and o["levels"] != 1:
        raise ValueError(f"the ternary neuron has exactly one level (k in {{-1, 0, 1}}): neuron.levels must be 1, "
                         f"got {o['levels']}")
    for key, default in (("mask_rescale", False), ("mask_operands", "q+k+attn"), ("mask_schedule", "random"),
                         ("mask_fanout", False), ("mask_seed", 0)):
        if o[key] != default and o["attention"] != "psa":
            raise ValueError(f"attention.{key}={o[key]} applies to attention=psa only (attention is "
                             f"{o['attention']!r})")
    if o["attention_map"] != "row_max" and o["attention"] not in ("ecm", "psa"):
        raise ValueError(f"attention.map={o['attention_map']} applies to attention=ecm or psa, which spike an "
                         f"attention map (attention is {o['attention']!r}): leave it at row_max")
    if o["centre_values"] and o["attention"] not in ("ecm", "psa"):
        raise ValueError(f"attention.centre_values=true applies to attention=ecm or psa, whose attention map is a "
                         f"softmax (attention is {o['attention']!r}): set it to false")
    if o["centre_values"] and o["attention_map"] != "softmax":
        raise ValueError("attention.centre_values=true applies to attention.map=softmax: the row_max map is "
                         "normalised by its own spiked row sums and loses no mass; set attention.map=softmax "
                         "or centre_values=false")
    if o["mask_p"] > 0 and o["attention"] != "psa":
        raise ValueError(f"attention.mask_p={o['mask_p']} applies to attention=psa only (attention is "
                         f"{o['attention']!r})")
    if o["coding"] == "differential":
        for what, name, ok in (("neuron", o["neuron"], o["neuron"] != "ternary"),
                               ("attention", o["attention"], o["attention"] in ("ecm", "psa")),
                               ("residual", o["residual"], o["residual"] == "membrane")):
            if not ok:
                raise ValueError(f"coding=differential sends changes of a neuron's level, which {what}={name} "
                                 f"cannot take (it needs rate-coded spikes or a leaky, hard-reset neuron): use "
                                 f"coding=rate, or neuron=signed_if / if / multi_threshold with attention=ecm or psa "
                                 f"and residual=membrane")
    if o["hysteresis"] > 0 and o["coding"] != "differential":
        raise ValueError(f"neuron.hysteresis={o['hysteresis']} applies to coding=differential only (coding is "
                         f"{o['coding']!r})")
    for what, name in (("attention", o["attention"]), ("residual", o["residual"])):
        if name in FIXED_ALPHABET and (o["levels"] != 1 or o["neuron"] == "multi_threshold"):
            raise ValueError(f"{what}={name} uses {FIXED_ALPHABET[name]}: it cannot use neuron={o['neuron']} with "
                             f"levels={o['levels']}; use neuron=signed_if (or if, ternary) with levels=1")


# --- entry points -----------------------------------------------------------------------------------------

def validate_options(options: Dict[str, Any], scope: str = "convert") -> None:
    """Check keyword options of ``convert()`` (scope 'convert') or ``finetune()`` (scope 'finetune') with the
    rules of their config keys; None is allowed where the API gives it a meaning (defaults)."""
    by_api = {k.api: k for k in keys_by_path().values() if k.api and (k.path.startswith("finetune.") == (scope == "finetune")
                                                               or k.path in ("progress",))}
    for name, value in options.items():
        key = by_api.get(name)
        if key is None:
            continue
        if value is None and name in ("v_init", "num_images"):  # the API's "the neuron's own" / "all images"
            continue
        key.check(value)


def validate_config(cfg: DictConfig) -> None:
    """Check every key of a composed config, then the rules across keys."""
    rules = keys_by_path()
    missing = missing_rules(cfg)
    if missing:
        raise ValueError(f"no validation rule for config key(s) {', '.join(missing)} (convert/schema.py)")
    for path, value in _leaves(cfg):
        rules[path].check(value)
    from convert.config import convert_options
    check_combination(convert_options(cfg))
    if cfg.data.name == "imagenet" and not cfg.data.root:
        raise ValueError("data=imagenet needs data.root=DIR (an ImageFolder root with train/ and val/)")


def bad_values(key: Key) -> List[Tuple[str, str]]:
    """(override value, why it is bad) for a generated bad-input matrix over this key."""
    out: List[Tuple[str, str]] = []
    if key.kind in ("int", "float"):
        out.append(("abc", "wrong type"))
        if key.kind == "int":
            out.append(("2.5", "not an integer"))
        else:
            out += [("nan", "NaN"), ("inf", "infinite")]
        if key.low is not None:
            below = key.low if key.low_open else key.low - 1
            out.append((_fmt(below), "below the range"))
            if key.low >= 0 and below != -1:
                out.append(("-1", "negative"))
        if key.high is not None:
            out.append((_fmt(key.high * 2 + 1) if key.high < 1e12 else "1e300", "above the range"))
    elif key.kind == "bool":
        out += [("maybe", "not a boolean")]  # OmegaConf reads integers as booleans (0: false, else true)
    elif key.kind == "choice":
        out += [("nonexistent", "not a choice"), ("''", "empty")]
    elif key.kind == "path":
        out += [("/nonexistent/file", "missing path")]
    elif key.kind == "device":
        out += [("gpu9", "unknown device"), ("cuda:x", "bad device index")]
    elif key.kind == "str":
        out += [("''", "empty")]
    elif key.kind == "variants":
        out += [("{a:1}", "a variant that is not a mapping of options")]
    if not key.nullable and key.kind not in ("str",):
        out.append(("null", "null"))
    return out


def markdown() -> str:
    """The RELIABILITY.md table of every key's rule and the bad values tests/test_schema.py tries on it."""
    lines = ["| key | valid values | Python API keyword | bad values tried |", "|---|---|---|---|"]
    for k in keys_by_path().values():
        tried = ", ".join(f"`{v}`" for v, _ in bad_values(k))
        lines.append(f"| `{k.path}` | {k.describe()} | {f'`{k.api}`' if k.api else '-'} | {tried} |")
    return "\n".join(lines) + "\n"

