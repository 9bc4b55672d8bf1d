"""Outputs benchmark on vit_fmnist: energy at each T vs the ANN (both accountings), the analog share,
checkpoint size and load time. Writes its section of BENCHMARKS.md.

    python -m benchmarks.outputs [--images 256] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.core import calibration_images, command_line, machine_info, write_whole
from convert import convert, energy_report, load, save
from models.data import fashion_mnist
from models.zoo import create_ann

BEGIN, END = "<!-- outputs:begin -->", "<!-- outputs:end -->"


def run(images: int = 256, steps=(1, 2, 4, 8, 16)):
    ann = create_ann("vit_fmnist")
    data = fashion_mnist("test")
    x = data.dataset.tensors[0][:images]
    snn = convert(ann, calibration_images(), timesteps=max(steps), progress=False)
    energy = {t: energy_report(snn, x, timesteps=t) for t in steps}
    with tempfile.TemporaryDirectory() as tmp:
        path = save(snn, Path(tmp) / "snn.safetensors")
        size = path.stat().st_size
        t0 = time.perf_counter()
        load(path)
        load_s = time.perf_counter() - t0
    return {**machine_info(data.source), "images": images, "checkpoint_bytes": size, "load_s": load_s,
            "energy": {t: {k: v for k, v in e.items() if k != "layers"} for t, e in energy.items()}}


def markdown(res, command) -> str:
    e1 = next(iter(res["energy"].values()))
    lines = [BEGIN, "## Energy and checkpoints (defaults, signed IF L=1)", "",
             f"Measured with `{command}` on {res['date']}: {res['machine']}; {res['images']} test images.", "",
             f"ANN: {e1['ann_macs'] / 1e6:.2f} M MACs per image, {e1['energy_ann_pj'] / 1e6:.2f} uJ.", "",
             "| T | SNN MACs (M) | SNN SOPs (M) | energy uJ | vs ANN | strict uJ | analog share | mean firing rate |",
             "|---|---|---|---|---|---|---|---|"]
    for t, e in res["energy"].items():
        rates = list(e["firing_rates"].values())
        lines.append(f"| {t} | {e['snn_macs'] / 1e6:.2f} | {e['snn_sops'] / 1e6:.2f} | {e['energy_snn_pj'] / 1e6:.2f} | "
                     f"{e['energy_snn_pj'] / e['energy_ann_pj']:.2f}x | {e['energy_snn_strict_pj'] / 1e6:.2f} | "
                     f"{100 * e['analog_share']:.0f}% | {sum(rates) / len(rates):.3f} |")
    top = next(reversed(res["energy"].values()))["analog_ops"][:4]
    lines += ["", "Operations that stay analog (largest shares of the SNN energy at the largest T): " +
              ", ".join(f"{o['module']} {100 * o['energy_share']:.1f}%" for o in top) +
              ". The patch embedding sees the analog image at every step; the expectation-compensated "
              "LayerNorm/GELU/softmax and the rescaling of the spike products stay MACs.", "",
              f"Checkpoint `snn.safetensors`: {res['checkpoint_bytes'] / 1e6:.2f} MB; `load()` rebuilds the SNN in "
              f"{res['load_s']:.2f} s (no ANN weights file needed).", END]
    return "\n".join(lines) + "\n"


def write_section(md_path: Path, section: str) -> None:
    """Replace the section between its begin and end markers (its first and last lines), or append it."""
    begin, end = section.splitlines()[0], section.rstrip("\n").splitlines()[-1]
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_whole(md_path, text)


def benchmark_main(name: str, doc: str, run_full, run_quick, markdown, add_arguments=None, variant=None,
                   plot=None) -> None:
    """The command line of a benchmark module: measure (``--quick``: a short version), keep the results as
    benchmarks/results/<name><variant>[-quick].json and write its section of BENCHMARKS.md; ``--render`` only
    rewrites the section (and the plot) from the saved results. ``run_full`` / ``run_quick`` take the parsed
    arguments, ``variant`` (optional) gives from them a suffix for results kept apart (e.g. another device's),
    and ``plot`` (optional) writes the figure from the results and the arguments."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite the section from the saved results")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    path = args.out / f"{name}{variant(args) if variant else ''}{'-quick' if args.quick else ''}.json"
    if args.render:
        res = json.loads(path.read_text())
    else:
        res = run_quick(args) if args.quick else run_full(args)
        res["command"] = command_line(f"benchmarks.{name}", skip=("--render",))
        args.out.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(res, indent=2))
    if plot:
        plot(res, args)
    write_section(args.markdown, markdown(res, res.get("command", f"python -m benchmarks.{name}").strip()))
    print(f"wrote {args.markdown}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    res = run(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outputs.json").write_text(json.dumps(res, indent=2))
    write_section(args.markdown, markdown(res, command_line("benchmarks.outputs")))


if __name__ == "__main__":
    main()
