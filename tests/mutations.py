"""Mutation check of the core: deliberate bugs, one at a time, each of which some test must catch.

    python -m tests.mutations            # every mutation against its tests (about 5 minutes on 2 cores)
    python -m tests.mutations --quick    # the cheap ones (the test suite runs these)
    python -m tests.mutations --only ecm-drops-previous-total

Each mutation replaces one exact piece of source (found exactly once, or the check stops: the list must
follow the code) in a copy of the working tree and runs the named tests there with ``pytest -x``; a
mutation *survives* when they all pass. Exit status 1 when any survives.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest node ids or files (with -k expressions after '::-k ')
    quick: bool = False


MUTATIONS: List[Mutation] = [
    Mutation("if-fires-one-level-too-high", "models/neurons.py",
             "return torch.floor(u).clamp_(-self.num_levels if self.signed else 0, self.num_levels)",
             "return (torch.floor(u) + (u >= 1).to(u.dtype)).clamp_(-self.num_levels if self.signed else 0, "
             "self.num_levels)",
             ("tests/test_neurons.py",), quick=True),
    Mutation("multi-threshold-hard-reset", "models/neurons.py",
             "    def __init__(self, levels: int = 8, threshold: float = 1.0, v_init: float = 0.0, signed: bool = True) -> None:\n"
             "        super().__init__(threshold, v_init)\n",
             "    def __init__(self, levels: int = 8, threshold: float = 1.0, v_init: float = 0.0, signed: bool = True) -> None:\n"
             "        super().__init__(threshold, v_init)\n        self.hard_reset = True\n",
             ("tests/test_neurons.py",)),
    Mutation("neuron-ignores-v-init", "models/neurons.py",
             "u = (x / theta).add_(self.v_init) if inplace else x / theta + self.v_init", "u = x / theta",
             ("tests/test_neurons.py",)),
    Mutation("fused-neuron-forgets-threshold", "models/neurons.py", ".addcdiv_(x, theta)", ".add_(x)",
             ("tests/test_fused.py",)),
    Mutation("kernel-drops-lower-clamp", "models/kernels.py",
             "k = tl.minimum(tl.maximum(tl.floor(u), lo), hi)", "k = tl.minimum(tl.floor(u), hi)",
             ("tests/test_fused.py::-k kernel",)),
    Mutation("kernel-restarts-carried-membrane", "models/kernels.py",
             "u = tl.load(u_ptr + offs, mask=mask)", "u = theta * 0.0 + v_init",
             ("tests/test_fused.py::-k kernel",)),
    Mutation("cpu-kernel-drops-lower-clamp", "models/csrc/kernels.c", "k = k < lo ? lo : k;\n", "\n",
             ("tests/test_fused.py::-k kernel",)),
    Mutation("cpu-kernel-repeats-first-threshold", "models/csrc/kernels.c", "repeated[i] = theta[i % period];",
             "repeated[i] = theta[0];", ("tests/test_fused.py::-k kernel",)),
    Mutation("cpu-kernel-restarts-carried-membrane", "models/csrc/kernels.c", "if (fresh)", "if (1)",
             ("tests/test_fused.py::-k kernel",)),
    Mutation("cpu-running-sums-ignore-carried-sum", "models/csrc/kernels.c",
             "sum[i] = before ? xs[start + i] + before[start + i] : xs[start + i];", "sum[i] = xs[start + i];",
             ("tests/test_chunked.py",)),
    Mutation("cpu-running-means-restart-count", "models/csrc/kernels.c",
             "                float count = (float)(t0 + t + 1);\n                for",
             "                float count = (float)(t + 1);\n                for", ("tests/test_chunked.py",)),
    Mutation("cpu-step-differences-forget-carried-total", "models/csrc/kernels.c",
             "yb[i] = before ? z - before[start + i] : z;", "yb[i] = z;", ("tests/test_chunked.py",)),
    Mutation("cpu-step-differences-scale-for-products", "models/csrc/kernels.c",
             "float z = divide ? yb[i] / count : yb[i] * count;", "float z = yb[i] * count;",
             ("tests/test_fused.py::-k spike_product",)),
    Mutation("cpu-kernel-cache-keeps-a-damaged-library", "models/native.py",
             "            except OSError:  # a damaged cached copy (a foreign or truncated file): built again\n"
             "                _build(compiler, flags, target)\n",
             "            except OSError:  # a damaged cached copy (a foreign or truncated file): built again\n"
             "                raise\n", ("tests/test_fused.py::-k damaged",)),
    Mutation("backward-ignores-hard-reset", "models/neurons.py",
             "d.addcmul_(later, out[t] == 0, value=neuron.leak)", "d.add_(later, alpha=neuron.leak)",
             ("tests/test_fused.py::-k backward",)),
    Mutation("backward-drops-threshold-scale-term", "models/neurons.py",
             "acc.addcmul_(grad_out, out).addcmul_(d, x, value=-1)", "acc.addcmul_(d, x, value=-1)",
             ("tests/test_fused.py::-k backward",)),
    Mutation("chunk-ecm-forgets-previous-total", "models/ecm.py", "        totals[0].sub_(before)\n", "",
             ("tests/test_chunked.py::-k expectation",)),
    Mutation("chunk-neuron-restarts-membrane", "models/neurons.py", "self.u = u if carry else None", "self.u = None",
             ("tests/test_chunked.py::-k neuron",)),
    Mutation("fused-ecm-overwrites-a-returned-output", "models/ecm.py",
             "_difference(z, total, reuse=t > 2)", "_difference(z, total, reuse=t > 1)",
             ("tests/test_ecm.py::-k overwritten",)),
    Mutation("cpu-step-differences-keep-no-total", "models/csrc/kernels.c",
             "                last[start + i] = prev[i];", "                ;", ("tests/test_fused.py::-k network",)),
    Mutation("cpu-running-sums-keep-no-sum", "models/csrc/kernels.c",
             "                last[start + i] = sum[i];", "                ;", ("tests/test_fused.py::-k network",)),
    Mutation("cpu-ecm-step-total-not-kept", "models/ecm.py", "divide, last=keep)[0], keep", "divide)[0], keep",
             ("tests/test_fused.py::-k network",)),
    Mutation("multi-step-product-off-in-the-ninth-digit", "models/ecm.py",
             "out = _compensated(products, before, self.step_index(products) + t0, t0, divide=True)",
             "out = _compensated(products, before, (self.step_index(products) + t0) * (1 + 1e-9), t0, divide=True)",
             ("tests/test_convert.py::-k bitwise_in_float64",)),
    Mutation("compile-option-ignored", "convert/network.py", "        if self.compiled:", "        if False:",
             ("tests/test_fused.py::-k compiled",)),
    Mutation("differential-sends-the-level-again", "models/neurons.py", "            out = out - self._prior\n",
             "", ("tests/test_coding.py::-k receiver",)),
    Mutation("hysteresis-band-ignores-s", "models/neurons.py",
             "0.5 + self.hysteresis - HYSTERESIS_MARGIN", "0.5 - HYSTERESIS_MARGIN",
             ("tests/test_coding.py::-k constant",)),
    Mutation("psa-rescales-the-ann", "models/attention.py",
             "if isinstance(m, SpikeMask) and not m.analog else 1.0", "if isinstance(m, SpikeMask) else 1.0",
             ("tests/test_variants.py::-k analog_mode_is_the_ann and psa",)),
    Mutation("even-mask-redraws-its-phases", "models/attention.py", "            if self.phase is None:\n",
             "            if True:\n", ("tests/test_variants.py::-k even_masks",)),
    Mutation("offset-not-subtracted-after-the-layer", "models/synapse.py",
             "torch.nn.functional.linear(o.expand(weight.shape[-1]), weight)",
             "0.0 * torch.nn.functional.linear(o.expand(weight.shape[-1]), weight)",
             ("tests/test_calibration.py::-k clip_of_an_unsigned",)),
    Mutation("offsets-measured-on-clipped-inputs", "calibration/offsets.py", "s.neuron.signed = True",
             "s.neuron.signed = s.neuron.signed", ("tests/test_calibration.py::-k anns_activations",)),
    Mutation("offset-beyond-the-data", "calibration/offsets.py",
             "offset = torch.minimum(signed_range, hist.max_neg).to(torch.float32)",
             "offset = signed_range.to(torch.float32)", ("tests/test_calibration.py::-k offsets_follow",)),
    Mutation("spike-driven-without-offsets", "calibration/__init__.py",
             "offset_report = input_offsets(net, mine, timesteps, progress) if offsets else {}", "offset_report = {}",
             ("tests/test_variants.py::-k converges_to_the_ann_as_t_grows",)),
    Mutation("centring-ignores-the-mask-gain", "models/attention.py",
             "deficit = 1.0 - (row_sums * gain if gain != 1.0 else row_sums)", "deficit = 1.0 - row_sums",
             ("tests/test_variants.py::-k constant_added",)),
    Mutation("centring-sums-the-values", "models/attention.py", "v.mean(-2, keepdim=True))",
             "v.sum(-2, keepdim=True))", ("tests/test_variants.py::-k constant_added",)),
    Mutation("centring-runs-in-analog-mode", "models/attention.py",
             "if self.centring is None or self.attn_neuron.analog:", "if self.centring is None:",
             ("tests/test_variants.py::-k centring_counts",)),
    Mutation("psa-masks-every-operand", "models/attention.py",
             "masked = [mask_p > 0 and name in mask_operands for name in MASK_OPERANDS]",
             "masked = [mask_p > 0 for name in MASK_OPERANDS]", ("tests/test_variants.py::-k exactly_the_named",)),
    Mutation("peer-energy-feeds-the-image-every-step", "benchmarks/peers.py",
             "analog(dense_per_step * float(v.flatten(2).ne(0).any(-1).sum()))",
             "analog(dense_per_step * v.shape[0] * v.shape[1])",
             ("tests/test_benchmarks.py::-k hand_count",)),
    Mutation("strict-counts-graded-values-as-sops", "convert/energy.py", "graded = k.abs() > 1", "graded = k.abs() > 8",
             ("tests/test_outputs.py::-k hand_count",)),
    Mutation("ecm-drops-previous-total", "models/ecm.py",
             "_difference(z, total,", "_difference(z, 0 * total,", ("tests/test_ecm.py",)),
    Mutation("rewrite-skips-neuron-before-fc2", "convert/rewrite.py",
             "            if kind == Kind.IMAGE:\n                self.rw.first_layers.add(path)",
             "            if kind == Kind.IMAGE or path.endswith('fc2'):\n                self.rw.first_layers.add(path)",
             ("tests/test_convert.py::-k every_linear",)),
    Mutation("checkpoint-forgets-timesteps", "convert/checkpoint.py", '"timesteps": snn.timesteps,',
             '"timesteps": 1,', ("tests/test_outputs.py",)),
    Mutation("checkpoint-drops-thresholds", "convert/checkpoint.py",
             'tensors, config["aliases"] = _unshared(snn.net.state_dict())',
             'tensors, config["aliases"] = _unshared({k: v for k, v in snn.net.state_dict().items() '
             'if "threshold" not in k})', ("tests/test_outputs.py",)),
    Mutation("mse-picks-largest-candidate", "calibration/thresholds.py",
             "best = torch.argmin(errors, dim=1)", "best = torch.zeros_like(torch.argmin(errors, dim=1))",
             ("tests/test_calibration.py::-k minimum_of_their_objective",), quick=True),
    Mutation("mse-error-ignores-clipping", "calibration/thresholds.py",
             "q = k * step  # the value each cell is mapped to",
             "q = torch.cat([k[:-1] * step, k[-1:] * step * 0 + 1e9], -1)  # the value each cell is mapped to",
             ("tests/test_calibration.py",)),
    Mutation("histogram-merge-sums-maxima", "calibration/statistics.py",
             'all_reduce(getattr(self, name), "max")', "all_reduce(getattr(self, name))",
             ("tests/test_distributed.py::-k merge",)),
    Mutation("resume-skips-optimiser-state", "convert/finetune.py",
             "        _load_optimizer(optimizer, resume_tensors)\n", "        pass\n",
             ("tests/test_finetune.py::-k resume",)),
    Mutation("resume-restarts-from-step-0", "convert/finetune.py",
             'step, history = resume_meta["step"], list(resume_meta["history"])',
             'step, history = 0, list(resume_meta["history"])',
             ("tests/test_finetune.py::-k resume",)),
    Mutation("no-ddp-gradient-averaging", "convert/finetune.py",
             "    if world_size() > 1:  # torchrun: each rank trains", "    if False:  # torchrun: each rank trains",
             ("tests/test_distributed.py::-k finetuning",)),
    Mutation("distillation-teacher-shuffled", "convert/finetune.py",
             "F.softmax(ann / tau, -1)", "F.softmax(ann[torch.randperm(len(ann))] / tau, -1)",
             ("tests/test_finetune.py::-k distillation",)),
    Mutation("ssa-analog-mode-leaks-relu", "models/attention.py",
             "self.q_neuron(q), self.v_neuron(v), self.k_neuron(k) if self.variant == \"ssa\" else None",
             "q, v = self.q_neuron(q), self.v_neuron(v)", ("tests/test_variants.py::-k analog_mode_is",)),
    Mutation("output-map-not-fitted", "calibration/corrections.py", "return gain, mean_a - gain * mean_b, explained",
             "return torch.ones_like(gain), torch.zeros_like(mean_a), explained",
             ("tests/test_variants.py::-k least_squares", "tests/test_normalization.py::-k least_squares")),
    Mutation("constant-norm-drops-shift", "models/normalization.py",
             "y = x * token_rows(self.norm_gain, x) + token_rows(self.norm_shift, x)",
             "y = x * token_rows(self.norm_gain, x)", ("tests/test_normalization.py::-k least_squares",)),
    Mutation("constant-norm-counted-as-mac", "convert/energy.py", "spiking_cost=not isinstance(m, ConstantNorm)",
             "spiking_cost=True", ("tests/test_normalization.py::-k costs_no_mac",)),
    Mutation("resume-teacher-unchecked", "convert/finetune.py",
             "load_training_state(o[\"resume\"], snn, origin)", "load_training_state(o[\"resume\"], snn, None)",
             ("tests/test_finetune.py::-k another_starting_network",)),
    Mutation("blend-ignores-lambda", "convert/finetune.py", "        if module.analog or self.value >= 1:\n",
             "        if True:\n", ("tests/test_variants.py::-k blend_at_zero",)),
    Mutation("block-output-term-dropped", "convert/finetune.py",
             'loss = loss + o["feature_distill"] * feature_loss(', 'loss = loss + 0 * feature_loss(',
             ("tests/test_variants.py::-k feature_distillation",)),
    Mutation("running-sums-drop-carried-sum", "models/ecm.py",
             "torch.add(xs[0], before, out=sums[0])", "sums[0].copy_(xs[0])",
             ("tests/test_ecm.py::-k running_sums",), quick=True),
    Mutation("running-sums-accumulate-in-double", "models/ecm.py",
             "        torch.add(sums[t - 1], xs[t], out=sums[t])\n    return sums\n",
             "        pass\n    return torch.cumsum(xs, dim=0)\n", ("tests/test_ecm.py::-k running_sums",), quick=True),
    Mutation("running-sums-backward-forgets-later-steps", "models/ecm.py", "grad[t].add_(grad[t + 1])", "pass",
             ("tests/test_ecm.py::-k running_sums",), quick=True),
    Mutation("freed-memory-unmapped-again", "convert/resources.py",
             "libc.mallopt(M_MMAP_MAX, 0) and ", "",
             ("tests/test_schema.py::-k freed_host_memory",)),
    Mutation("freed-memory-never-given-back", "convert/resources.py", '_host_heap["libc"].malloc_trim(0)', "None",
             ("tests/test_schema.py::-k freed_host_memory",)),
    Mutation("error-sources-analog-neurons-clip", "benchmarks/error_sources.py",
             "analog_mode(snn.net, exact=True, only=analog)", "analog_mode(snn.net, only=analog)",
             ("tests/test_benchmarks.py::-k error_sources",)),
    Mutation("analog-mode-subset-left-analog", "calibration/statistics.py",
             "        for n in switched:\n            n.analog = False\n", "",
             ("tests/test_benchmarks.py::-k error_sources",)),
]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv*", "venv", "runs", "outputs", "multirun", "__pycache__",
                                    "*.egg-info", ".hypothesis", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _pytest_args(tests: Tuple[str, ...]) -> List[str]:
    args: List[str] = []
    for t in tests:
        path, _, k = t.partition("::-k ")
        args += [path] + (["-k", k] if k else [])
    return args


def check_applies(m: Mutation, root: Path = ROOT) -> None:
    """The mutated text occurs exactly once (else the list no longer follows the code)."""
    count = (root / m.path).read_text().count(m.old)
    if count != 1:
        raise ValueError(f"mutation {m.name}: its text occurs {count} times in {m.path}, not once")


def run_one(m: Mutation, copy: Path) -> Tuple[bool, float]:
    """(survived, seconds) of one mutation applied to ``copy``, restored afterwards."""
    target = copy / m.path
    source = target.read_text()
    check_applies(m, copy)
    target.write_text(source.replace(m.old, m.new))
    start = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              *_pytest_args(m.tests)], cwd=copy, capture_output=True, text=True)
    finally:
        target.write_text(source)
    return res.returncode == 0, time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cheap mutations")
    parser.add_argument("--only", nargs="+", help="mutation names")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if (not args.quick or m.quick) and (not args.only or m.name in args.only)]
    for m in chosen:
        check_applies(m)
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tree"
        _copy_tree(copy)
        for m in chosen:
            survived, seconds = run_one(m, copy)
            print(f"{'SURVIVED' if survived else 'killed  '}  {m.name:40s} {seconds:5.1f} s  ({', '.join(m.tests)})",
                  flush=True)
            if survived:
                survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations killed"
          + (f"; surviving: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
