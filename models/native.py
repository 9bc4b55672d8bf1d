"""Fused CPU kernels of the simulation (integrate-and-fire neurons, the running sums and step differences of
expectation compensation and spike products): ``csrc/kernels.c``, compiled on first use with the system's C
compiler ($CC, else ``cc``) and called through ctypes. They run on as many OpenMP threads as
``torch.get_num_threads()``; loaded after torch, they share torch's OpenMP runtime (the same libgomp.so.1).

The shared library is cached under $VIT_SNN_CACHE (else $XDG_CACHE_HOME/vit-snn, else ~/.cache/vit-snn),
named by a hash of the source, the compiler, its flags and this CPU (it is built for the CPU it runs on), and
written under a temporary name then renamed, so concurrent processes never load a half-written file. Without
a working compiler (one warning says so), or with VIT_SNN_CPU_KERNEL=0, ``library()`` is None and the
simulation keeps the eager path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from models.files import replacing

SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
# no contraction into FMAs and IEEE division (no fast math): each operation rounds as the eager path's does;
# -fno-trapping-math only lets floor vectorise (it gives up floating-point exception flags, not values)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
# tried in this order: for this CPU's instruction set and threaded, then without what the compiler refuses
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
# fewer element-steps than this per extra thread are not worth waking a thread
WORK_PER_THREAD = 2 ** 14
_state = {"library": None, "tried": False}


def cache_dir() -> Path:
    if os.environ.get("VIT_SNN_CACHE"):
        return Path(os.environ["VIT_SNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-snn"


def _cpu_signature() -> str:
    """What the code built with -march=native depends on: the machine and its instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _target(compiler: list, version: str, flags: tuple) -> Path:
    """The cached library's path, named by what it is built from and for."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(compiler), version, " ".join(flags),
                                    _cpu_signature()]).encode()).hexdigest()[:20]
    return cache_dir() / f"kernels-{key}.so"


def _build(compiler: list, flags: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:
        subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, text=True)


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("VIT_SNN_CPU_KERNEL", "1") == "0":
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        warnings.warn(f"no C compiler ({' '.join(compiler)}: {err}); CPU simulations run the eager path, slower: "
                      f"install one (apt-get install gcc) or set CC")
        return None
    errors = []
    for variant in VARIANTS:
        flags = variant + FLAGS
        target = _target(compiler, version, flags)
        try:
            if not target.exists():
                _build(compiler, flags, target)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:  # a damaged cached copy (a foreign or truncated file): built again
                _build(compiler, flags, target)
                lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(getattr(err, "stderr", None) or str(err))
            continue
        ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
        for name, args in (("if_sequence", [ptr, ptr, ptr, ptr, i64, i64, i64, i32, f32, f32, f32, i32]),
                           ("running_sums", [ptr, ptr, ptr, ptr, i64, i64, i64, i32, i32]),
                           ("step_differences", [ptr, ptr, ptr, i64, i64, i64, i32, i32])):
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
        return lib
    warnings.warn(f"the CPU kernels {SOURCE.name} did not build in {cache_dir()} ({errors[-1].strip()[-500:]}); "
                  f"CPU simulations run the eager path, slower (a read-only cache folder: set VIT_SNN_CACHE)")
    return None


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on the first call of the process (None where it cannot be)."""
    if not _state["tried"]:
        _state["library"], _state["tried"] = _load(), True
    return _state["library"]


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))


def _pointer(x: Optional[torch.Tensor]):
    return None if x is None else x.data_ptr()


def _step(before: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A carried step's tensor as a contiguous block shaped like one step of ``like``."""
    return None if before is None else before.expand_as(like[0]).contiguous()


def holds_one_step(out: torch.Tensor, shape) -> bool:
    """Whether a kernel can write one step of ``shape`` into ``out``: contiguous float32 of that shape."""
    return out.is_contiguous() and out.shape == shape and out.dtype == torch.float32


def _one_step(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out``, which a kernel writes one step of ``like`` into (``holds_one_step``)."""
    if not holds_one_step(out, like.shape[1:]):
        raise ValueError(f"a kernel's output for one step must be a contiguous float32 tensor {tuple(like.shape[1:])}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def if_sequence(xs: torch.Tensor, u: Optional[torch.Tensor], block: torch.Tensor, v_init: float, lo: int,
                hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``models.kernels.if_sequence`` on CPU float32 tensors: (outputs [T, B, ...], final membrane)."""
    xs = xs.contiguous()
    fresh = u is None
    u = torch.empty_like(xs[0]) if fresh else u.contiguous()
    out = torch.empty_like(xs)
    steps, n = xs.shape[0], xs[0].numel()
    if n:
        block = block.contiguous()
        library().if_sequence(xs.data_ptr(), u.data_ptr(), out.data_ptr(), block.data_ptr(), steps, n,
                              block.numel(), int(fresh), float(v_init), float(lo), float(hi), _threads(steps * n))
    return out, u


def running_sums(xs: torch.Tensor, before: Optional[torch.Tensor], t0: int, divide: bool, keep_last: bool,
                 last: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[T, B, ...] -> S(t) = S(t-1) + x(t) from S(0) = ``before`` (None: 0), or S(t) / (t0 + t) with ``divide``;
    and S(T) where ``keep_last`` or ``last`` is given (then written into it; it may be ``before``: a sum kept in
    place)."""
    xs = xs.contiguous()
    before = _step(before, xs)
    out = torch.empty_like(xs)
    last = _one_step(last, xs) if last is not None else torch.empty_like(xs[0]) if keep_last else None
    if xs.numel():
        library().running_sums(xs.data_ptr(), _pointer(before), out.data_ptr(), _pointer(last), xs.shape[0],
                               xs[0].numel(), t0, int(divide), _threads(xs.numel()))
    return out, last


def step_differences(y: torch.Tensor, before: Optional[torch.Tensor], t0: int, divide: bool,
                     last: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, B, ...] -> z(t) - z(t-1) with z(t) = y(t) * (t0 + t) (or y(t) / (t0 + t) with ``divide``), z(0) =
    ``before`` (None: the first step's z kept); in place on ``y`` where it is contiguous. ``last`` (contiguous,
    shaped like one step of ``y``; it may be ``before``) receives z(T)."""
    y = y.contiguous()
    before = _step(before, y)
    if last is not None:
        last = _one_step(last, y)
    if y.numel():
        library().step_differences(y.data_ptr(), _pointer(before), _pointer(last), y.shape[0], y[0].numel(), t0,
                                   int(divide), _threads(y.numel()))
    return y
