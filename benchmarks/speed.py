"""Simulation speed: images/s and the cost of one SNN timestep relative to one ANN forward.

    python -m benchmarks.speed [--models vit_fmnist vit_base_patch16_224] [--device cuda] [--batch 64 8]
                               [--timesteps 1 4 16] [--chunk 4] [--bf16] [--compile]
                               [--finetune-timesteps 1 2 4 8]
                               [--quick]

For every model (a reference model from models/zoo.py with its weights and Fashion-MNIST images, or any
timm name with random weights and random images at its own input size) and its batch size: one conversion
with the default options, then, in the same process and interleaved so that drifts of the machine hit
both alike, the best of ``--repeats`` timings of one ANN forward and of ``simulate`` for every T in step
('s') and multi-step ('m') mode, and multi-step in chunks of ``--chunk`` steps (the state carried between
calls). Reported per (mode, T): images/s and the per-step ratio (simulation seconds / T / ANN forward
seconds). Also: how far each mode's outputs are from step mode's (and on a GPU, step mode's from the CPU's),
peak memory of the simulation (CUDA: the allocator's peak; CPU: the peak resident size of a fresh process
running it, VmHWM), where the time goes per module
type (self time from forward hooks, at the largest T, both modes), with ``--compile`` the same for the
simulation through torch.compile (and the seconds of its first, compiling call), the fused kernels (on a GPU
with Triton: the neurons, models.kernels; on the CPU with a C compiler: the neurons and the running means and
step differences of expectation compensation, models.native) against the eager path at every T, and with
``--bf16`` the speed and the
effect on predictions of running the analog layers under bfloat16 autocast. With ``--peer-images N``
(vit_fmnist, Fashion-MNIST test images): the seconds of our whole accuracy-vs-T curve for T = 1..16 (one
anytime run, ANN reference included) against SpikingJelly's STA recipe evaluating T=16 alone on the same
weights and images (benchmarks.peers), in the same process. With ``--finetune-timesteps``: seconds per
fine-tuning step (forward over T, backward through time, AdamW update) at each T for the first model, and
the seconds of one Fashion-MNIST epoch (60,000 images) at that rate.
Writes benchmarks/results/speed[-quick].json and the ``speed`` section of BENCHMARKS.md (another device's
results: speed-cuda[-quick].json and the ``speed-cuda`` section).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.core import machine_info
from benchmarks.outputs import benchmark_main
from convert import convert
from models import kernels
from models.zoo import FMNIST_MODELS, create_ann

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"  # the CPU's section; another device's: markers(device)
MODES = ("s", "m")  # step, multi-step; "m<c>": multi-step in chunks of c steps (--chunk)


def markers(device: str):
    """BENCHMARKS.md section markers for results on ``device`` ('cpu': BEGIN, END; 'cuda[:i]': speed-cuda)."""
    kind = device.split(":")[0]
    return (BEGIN, END) if kind == "cpu" else (f"<!-- speed-{kind}:begin -->", f"<!-- speed-{kind}:end -->")


def split_mode(mode: str):
    """'s', 'm' or 'm<c>' -> (step_mode, chunk)."""
    return mode[0], (int(mode[1:]) if len(mode) > 1 else None)


def simulate_in(snn, x, mode: str, T: int) -> torch.Tensor:
    """``snn.simulate(x, T)`` in ``mode`` ('s', 'm' or 'm<c>'), which stays set on ``snn``."""
    snn.step_mode, snn.chunk = split_mode(mode)
    return snn.simulate(x, T)


def mode_label(mode: str) -> str:
    step_mode, chunk = split_mode(mode)
    return "step" if step_mode == "s" else "multi-step" + (f", chunks of {chunk}" if chunk else "")


def model_and_images(name: str, batch: int, device: str):
    """The ANN in eval mode and a batch of its inputs (bundled Fashion-MNIST images for reference models)."""
    if name in FMNIST_MODELS:
        from models.data import load_bundled_fmnist
        ann, x = create_ann(name), load_bundled_fmnist("test").tensors[0][:batch]
    else:
        import timm
        ann = timm.create_model(name, pretrained=False)
        size = ann.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    return ann.eval().to(device), x.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved_best(calls: dict, repeats: int, device: str) -> dict:
    """The best of ``repeats`` timings (s) of every call (key -> function), the calls interleaved so that drifts
    of the machine hit all of them alike."""
    best = {key: float("inf") for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            best[key] = min(best[key], _seconds(fn, device))
    return best


def module_profile(snn, x, timesteps: int, device: str = "cpu") -> Dict[str, float]:
    """Self time (s) per module type over one simulation: each module's forward minus its children's (on a GPU
    the hooks wait for the device, so that a module's time is its kernels' and not their launch)."""
    times: Dict[str, float] = collections.Counter()
    stack: List[list] = []

    def pre(module, args):
        _sync(device)
        stack.append([time.perf_counter(), 0.0])

    def post(module, args, out):
        _sync(device)
        start, children = stack.pop()
        spent = time.perf_counter() - start
        times[type(module).__name__] += spent - children
        if stack:
            stack[-1][1] += spent

    handles = [h for m in snn.net.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        snn.simulate(x, timesteps)
    finally:
        for h in handles:
            h.remove()
    return dict(times)


def device_peak_memory_mb(snn, x, mode: str, T: int) -> float:
    """Peak memory (MB) of simulating T steps on a GPU above what was allocated before: the CUDA allocator's
    peak, in this process."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    simulate_in(snn, x, mode, T)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_mb(name: str, batch: int, mode: str, T: int, kept: bool = False) -> float:
    """Peak memory (MB) of simulating T steps on the CPU above what the converted model holds: the peak
    resident size of a fresh process (VmHWM, reset after the conversion through /proc/self/clear_refs) minus
    its resident size before the simulation. glibc's mmap threshold is fixed at 128 KiB there (so the freed
    memory is not kept: convert.resources.keep_freed_memory stands aside): its default adapts to what was freed,
    which keeps some temporaries out of the resident size and not others. ``kept``: glibc as a default process
    has it, with freed memory kept for reuse (the heap's peak, fragments included)."""
    step_mode, chunk = split_mode(mode)
    code = ("import re, torch; from benchmarks.speed import model_and_images; from convert import convert;"
            "kb = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
            f"ann, x = model_and_images({name!r}, {batch}, 'cpu');"
            f"snn = convert(ann, x[:2], timesteps={T}, step_mode={step_mode!r}, chunk={chunk!r}, progress=False);"
            "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS'); snn.simulate(x);"
            "print((kb('VmHWM') - base) / 1024)")
    env = {**os.environ} if kept else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"memory probe for {name} failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def measure(name: str, batch: int, timesteps, device: str = "cpu", repeats: int = 3, profile: bool = True,
            memory: bool = True, use_bf16: bool = False, chunk: Optional[int] = None,
            use_compile: bool = False) -> dict:
    torch.manual_seed(0)
    ann, x = model_and_images(name, batch, device)
    snn = convert(ann, x, timesteps=max(timesteps), progress=False)
    modes = MODES + ((f"m{chunk}",) if chunk else ())
    with torch.no_grad():
        ann(x)  # warm-up: first calls allocate and pick kernels
        for mode in modes:
            simulate_in(snn, x, mode, min(timesteps))
        best = interleaved_best({"ann": lambda: ann(x), **{(m, T): lambda m=m, T=T: simulate_in(snn, x, m, T)
                                                           for m in modes for T in timesteps}}, repeats, device)
    res = {"batch": batch, "images": "Fashion-MNIST (bundled)" if name in FMNIST_MODELS else "random",
           "input": list(x.shape[1:]), "ann_forward_s": best["ann"], "ann_images_per_s": batch / best["ann"],
           "modes": {m: {str(T): {"simulate_s": best[m, T], "images_per_s": batch / best[m, T],
                             "per_step_ratio": best[m, T] / T / best["ann"]} for T in timesteps} for m in modes}}
    res["agreement"] = agreement(snn, ann, x, modes, max(timesteps))
    snn.chunk = None
    if profile:
        res["profile"] = {}
        for mode in MODES:
            snn.step_mode = mode
            res["profile"][mode] = module_profile(snn, x, max(timesteps), device)
    for key, variant, wanted in (("bf16", bf16, use_bf16), ("compile", through_compile, use_compile)):
        if wanted:
            res[key] = variant_effect(snn, x, max(timesteps), device, repeats, variant)
    with torch.no_grad():
        fused = kernels.usable(x, steps=2)
    if fused:
        res["kernels"] = kernel_effect(snn, x, timesteps, device, repeats)
    if memory:
        res["peak_memory_mb"] = {m: {str(T): device_peak_memory_mb(snn, x, m, T) if x.is_cuda else
                                     peak_memory_mb(name, batch, m, T) for T in timesteps} for m in modes}
    return res


def _difference(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest |out - ref| over the largest |ref|, and top-1 agreement (%), of two outputs [..., classes]."""
    return {"max_logit_error": float((out - ref).abs().max() / ref.abs().max()),
            "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean() * 100)}


@torch.no_grad()
def agreement(snn, ann, x, modes, T: int, cpu_images: int = 8) -> dict:
    """Every mode's outputs over T steps against step mode's on the same inputs (all steps); on a GPU step
    mode's against the CPU's eager step mode for the first ``cpu_images`` images; and, for scale, step mode's
    output at T against the ANN's (a spike that flips on a rounding difference moves the output by as much)."""
    ref = simulate_in(snn, x, "s", T)
    res = {mode: _difference(simulate_in(snn, x, mode, T), ref) for mode in modes if mode != "s"}
    res["ann"] = _difference(ref[-1:], ann(x)[None])
    if x.is_cuda:
        cpu = copy.deepcopy(snn).cpu()
        res["cpu"] = _difference(ref[:, :cpu_images].cpu(), simulate_in(cpu, x[:cpu_images].cpu(), "s", T))
    return res


@contextlib.contextmanager
def bf16(snn, x):
    """bfloat16 autocast around the simulation (Linear/Conv/matmul in bf16, neurons as the dtypes fall)."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def through_compile(snn, x):
    """The simulation through torch.compile (the ``compile`` option), compiled at its first call."""
    snn.compiled = True
    try:
        yield
    finally:
        snn.compiled = False


def variant_effect(snn, x, T: int, device: str, repeats: int, variant) -> dict:
    """``variant`` (bf16 or through_compile) against float32 eager simulation, in both modes: the seconds of its
    first call (compilation included), its speed-up once warm, and how far its output at T is from eager's."""
    out = {}
    for mode in MODES:
        snn.step_mode = mode
        ref = snn.simulate(x, T)[-1]
        with variant(snn, x):
            first = _seconds(lambda: snn.simulate(x, T), device)
            low = snn.simulate(x, T)[-1].float()
            seconds = min(_seconds(lambda: snn.simulate(x, T), device) for _ in range(repeats))
        eager = min(_seconds(lambda: snn.simulate(x, T), device) for _ in range(repeats))
        out[mode] = {"T": T, "speedup": eager / seconds, "first_call_s": first, **_difference(low, ref)}
    return out


@torch.no_grad()
def kernel_effect(snn, x, timesteps, device: str, repeats: int) -> dict:
    """The fused kernels (models.kernels and models.native, on by default where they run) against the eager path,
    in both modes and in chunks of 4, at every T: speed-up of the simulation, interleaved timings, and whether
    the outputs of all T steps are bitwise equal."""
    out = {}
    for mode in MODES + ("m4",):
        out[mode] = {}
        for T in timesteps:
            def fused():
                return simulate_in(snn, x, mode, T)

            def eager():
                with kernels.disabled():
                    return simulate_in(snn, x, mode, T)

            outputs = fused(), eager()
            times = interleaved_best({"fused": fused, "eager": eager}, repeats, device)
            out[mode][str(T)] = {"speedup": times["eager"] / times["fused"],
                                 "bitwise_equal": torch.equal(*outputs), **_difference(*outputs)}
    snn.step_mode, snn.chunk = "s", None
    return out


EPOCH_IMAGES = 60_000  # one Fashion-MNIST training epoch


def finetune_timing(name: str, batch: int, timesteps, device: str = "cpu", steps: int = 3, repeats: int = 3) -> dict:
    """Best of ``repeats`` interleaved timings of ``steps`` fine-tuning steps (batch ``batch``, default options)
    at every T, one conversion per T; seconds per step and per epoch of EPOCH_IMAGES images."""
    from convert.finetune import finetune
    torch.manual_seed(0)
    ann, x = model_and_images(name, batch, device)
    data = (x.repeat(steps, *([1] * (x.dim() - 1))), torch.randint(0, ann.num_classes, (steps * batch,)))
    snns = {T: convert(ann, x, timesteps=T, progress=False) for T in timesteps}

    def train(T, n):
        finetune(snns[T], (data[0][:n * batch], data[1][:n * batch]), batch_size=batch, progress=False)

    for T in timesteps:
        train(T, 1)  # warm-up
    best = interleaved_best({T: lambda T=T: train(T, steps) for T in timesteps}, repeats, device)
    return {"model": name, "batch": batch, "steps": steps,
            "timesteps": {str(T): {"step_s": best[T] / steps, "epoch_s": best[T] / steps * -(-EPOCH_IMAGES // batch)}
                          for T in timesteps}}


def peer_timing(images: int, T: int = 16) -> dict:
    """Seconds of our T = 1..T curve vs SpikingJelly's single-T evaluation, vit_fmnist, same images."""
    from torch.utils.data import Subset

    from benchmarks import peers
    from benchmarks.core import calibration_images
    from models.data import fashion_mnist
    from models.torchvision_port import to_torchvision
    torch.manual_seed(0)
    ann, calib = create_ann("vit_fmnist"), calibration_images()
    test = Subset(fashion_mnist("test").dataset, range(images))
    test_x = torch.stack([test[i][0] for i in range(len(test))])
    test_y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    sj = peers.spikingjelly_run(to_torchvision(ann), calib, test_x, test_y, T)
    ours = peers.ours_run(ann, calib, test, [T], {})
    return {"images": images, "T": T, "spikingjelly_evaluate_s": sj["evaluate_s"], "spikingjelly_top1": sj["top1"],
            "ours_curve_s": ours["evaluate_s"], "ours_top1_at_T": ours["top1"][T],
            "ratio": ours["evaluate_s"] / sj["evaluate_s"]}


def run(models, batches, timesteps, device="cpu", repeats=3, profile=True, memory=True, bf16=False,
        peer_images=0, finetune_timesteps=(), chunk=None, compile=False) -> dict:
    if len(batches) not in (1, len(models)):
        raise SystemExit(f"--batch takes one size or one per model ({len(models)}), got {len(batches)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; run without --device for the CPU")
    batches = batches * len(models) if len(batches) == 1 else batches
    info = machine_info("bundled Fashion-MNIST images / random inputs")
    if device.startswith("cuda"):
        info["machine"] += f", {torch.cuda.get_device_name()}"
    res = {**info, "device": device, "timesteps": list(timesteps),
           "models": {name: measure(name, b, list(timesteps), device, repeats, profile, memory, bf16, chunk, compile)
                      for name, b in zip(models, batches)}}
    if peer_images:
        res["peer"] = peer_timing(peer_images)
    if finetune_timesteps:
        res["finetune"] = finetune_timing(models[0], batches[0], list(finetune_timesteps), device, repeats=repeats)
    return res


KERNELS = {True: "C: neurons, running means, step differences; models.native", False: "Triton: neurons; models.kernels"}


def markdown(res: dict, command: str) -> str:
    Ts = res["timesteps"]
    begin, end = markers(res["device"])
    title = "" if res["device"] == "cpu" else f" ({res['device']})"
    lines = [begin, f"## Speed{title}: one timestep vs one ANN forward", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}, device {res['device']}. "
             "Best of several interleaved timings in one process; per-step ratio = simulation seconds / T / "
             "one ANN forward's seconds (1.0 is the cost of dense simulation: one pass of the network per step).",
             "", "| model | batch | ANN images/s | mode | " + " | ".join(f"T={T} ratio (img/s)" for T in Ts)
             + " | peak MB at " + f"T={Ts[-1]} |", "|---|---|---|---|" + "---|" * (len(Ts) + 1)]
    for name, r in res["models"].items():
        for mode in r["modes"]:
            cells = [f"{r['modes'][mode][str(T)]['per_step_ratio']:.2f}x ({r['modes'][mode][str(T)]['images_per_s']:.1f})"
                     for T in Ts]
            peak = r.get("peak_memory_mb", {}).get(mode, {}).get(str(Ts[-1]))
            lines.append(f"| {name} | {r['batch']} | {r['ann_images_per_s']:.1f} | "
                         f"{mode_label(mode)} | " + " | ".join(cells)
                         + f" | {'-' if peak is None else f'{peak:.0f}'} |")
    for name, r in res["models"].items():
        if "profile" not in r:
            continue
        lines += ["", f"Where the time goes, {name} (batch {r['batch']}, T={Ts[-1]}; self time per module type "
                  "from forward hooks, which add their own small cost; share of the total, %):", "",
                  "| module type | step | multi-step |", "|---|---|---|"]
        totals = {m: sum(r["profile"][m].values()) for m in MODES}
        kinds = sorted(set(r["profile"]["s"]) | set(r["profile"]["m"]), key=lambda k: -r["profile"]["s"].get(k, 0))
        for kind in kinds[:12]:
            lines.append(f"| {kind} | " + " | ".join(f"{100 * r['profile'][m].get(kind, 0) / totals[m]:.1f}"
                                                     for m in MODES) + " |")
    lines.append("")
    for name, r in res["models"].items():
        for mode, d in r.get("agreement", {}).items():
            what = {"cpu": "step mode on the CPU (eager, float32)", "ann": "the ANN"}.get(mode, "step mode")
            subject = "step mode" if mode in ("cpu", "ann") else mode_label(mode)
            steps = f"T={Ts[-1]}" if mode == "ann" else f"T = 1..{Ts[-1]}"
            lines.append(f"- {name}, {subject} vs {what}, {steps}: largest logit difference "
                         f"{d['max_logit_error']:.1e} of the largest logit, top-1 agreement {d['top1_agreement']:.2f}%")
        for mode, k in r.get("kernels", {}).items():
            equal = all(v["bitwise_equal"] for v in k.values())
            lines.append(f"- {name}, fused kernels ({KERNELS[res['device'] == 'cpu']}) against the eager path, "
                         f"{mode_label(mode)}: "
                         + ", ".join(f"T={T} {v['speedup']:.2f}x" for T, v in k.items()) + " the eager speed; outputs "
                         + ("bitwise equal at every step" if equal else "not bitwise equal (largest logit difference "
                            f"{max(v['max_logit_error'] for v in k.values()):.1e} of the largest logit)"))
        if "compile" in r:
            for mode, b in r["compile"].items():
                lines.append(f"- {name}, torch.compile (`compile=true`), {mode_label(mode)}, T={b['T']}: "
                             f"{b['speedup']:.2f}x the eager speed once compiled (first call, compiling: "
                             f"{b['first_call_s']:.0f} s), top-1 agreement with eager {b['top1_agreement']:.1f}%, "
                             f"largest logit difference {b['max_logit_error']:.1e} of the largest logit")
        if "bf16" in r:
            if r["images"] == "random":
                lines.append(f"- {name} has random weights: its predictions are near ties, so its bf16 agreement "
                             "says little; the speed-up does")
            for mode, b in r["bf16"].items():
                lines.append(f"- {name}, bf16 autocast, {mode_label(mode)}, T={b['T']}: "
                             f"{b['speedup']:.2f}x the float32 speed, top-1 agreement with float32 "
                             f"{b['top1_agreement']:.1f}%, largest logit error {b['max_logit_error']:.3f} of the "
                             "largest logit")
    if "peer" in res:
        p = res["peer"]
        lines += ["", f"Against SpikingJelly (vit_fmnist, {p['images']} test images, batch 256): our whole accuracy-vs-T "
                  f"curve for T = 1..{p['T']} (one anytime run, ANN reference included) took {p['ours_curve_s']:.1f} s, "
                  f"{p['ratio']:.2f}x the {p['spikingjelly_evaluate_s']:.1f} s of SpikingJelly's STA recipe evaluating "
                  f"T={p['T']} alone (top-1 at T={p['T']}: ours {p['ours_top1_at_T']:.2f}, SpikingJelly "
                  f"{p['spikingjelly_top1']:.2f})."]
    if "finetune" in res:
        f = res["finetune"]
        lines += ["", f"Fine-tuning ({f['model']}, batch {f['batch']}, default options; best of interleaved timings "
                  f"of {f['steps']} steps; an epoch is {EPOCH_IMAGES:,} images at that rate):", "",
                  "| T | s per step | s per epoch |", "|---|---|---|"]
        lines += [f"| {T} | {v['step_s']:.3f} | {v['epoch_s']:.0f} |" for T, v in f["timesteps"].items()]
    return "\n".join(lines + ["", end]) + "\n"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["vit_fmnist", "vit_base_patch16_224"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="one size, or one per model")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the simulation through torch.compile")
    parser.add_argument("--peer-images", type=int, default=0,
                        help="also time the T=1..16 curve against SpikingJelly's T=16 on this many test images")
    parser.add_argument("--chunk", type=int, default=4, help="also time multi-step mode in chunks of this many "
                        "steps (0: not)")
    parser.add_argument("--finetune-timesteps", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="time fine-tuning steps of the first model at these T (none: skip)")


def main() -> None:
    def full(a):
        return run(a.models, a.batch, a.timesteps, a.device, a.repeats, bf16=a.bf16, compile=a.compile,
                   peer_images=a.peer_images,
                   finetune_timesteps=a.finetune_timesteps, chunk=a.chunk or None)

    def quick(a):  # seconds: the small reference model, small batch, no memory probes
        return run(["vit_fmnist"], [8], (1, 2), a.device, repeats=1, memory=False, bf16=a.bf16,
                   finetune_timesteps=(1, 2), chunk=1)

    benchmark_main("speed", __doc__, run_full=full, run_quick=quick, markdown=markdown, add_arguments=_arguments,
                   variant=lambda a: "" if a.device == "cpu" else "-" + a.device.split(":")[0])


if __name__ == "__main__":
    main()
