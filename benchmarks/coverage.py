"""Which timm transformers convert: every architecture with pretrained weights, per family (COVERAGE.md).

    python -m benchmarks.coverage [--out COVERAGE.md] [--quick] [--families eva swin_transformer ...]

Each architecture is built at full size on the meta device (no weights, no memory) and rewritten exactly
as ``convert`` rewrites it (``convert.api.build_spiking``: traced, every Linear input a neuron, expectation
compensation, spiking attention); a checkpoint counts as converted when its architecture does. For each
family with a tiny instance in models.families, the analog share of the energy (training-free, T=4,
random images and weights) is measured on that instance. ``--quick``: the first architecture of each
family only, and no analog shares (the test suite runs it).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import timm
import torch

from benchmarks.core import write_whole
from convert.api import build_spiking
from convert.network import input_spec
from models.families import HYBRID, PURE_ATTENTION, TINY, tiny
from models.zoo import COVERAGE_TABLE


def checkpoints_by_arch() -> Dict[str, List[str]]:
    by_arch: Dict[str, List[str]] = collections.defaultdict(list)
    for name in timm.list_models(pretrained=True):
        by_arch[name.split(".")[0]].append(name)
    return by_arch


def try_architecture(arch: str) -> str:
    """'' when the architecture converts, else the converter's one-line reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                ann = timm.create_model(arch, pretrained=False).eval()
            build_spiking(ann, 4, {}, input_spec(ann))
            return ""
        except ValueError as exc:  # UnsupportedModuleError and bad-input errors
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a crash is a finding to report, not a reason to stop
            return f"crash: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def analog_share(name: str) -> float:
    from convert import convert, energy_report
    ann, size = tiny(name)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    snn = convert(ann, x, timesteps=4, progress=False)
    return energy_report(snn, x)["analog_share"]


def run(families, quick: bool) -> dict:
    by_arch = checkpoints_by_arch()
    modules = timm.models._registry._model_to_module
    results = {}
    for family in families:
        archs = sorted(a for a in by_arch if modules.get(a) == family)
        if quick:
            archs = archs[:1]
        rows = {}
        for arch in archs:
            t0 = time.time()
            rows[arch] = {"reason": try_architecture(arch), "checkpoints": len(by_arch[arch]),
                          "seconds": time.time() - t0}
            print(f"{family:28s} {arch:48s} {'ok' if not rows[arch]['reason'] else rows[arch]['reason'][:90]}",
                  file=sys.stderr, flush=True)
        results[family] = rows
    shares = {}
    if not quick:
        for name, (arch, _, _) in TINY.items():
            fam = modules.get(arch)
            if fam in families:
                shares.setdefault(fam, {})[name] = analog_share(name)
    return {"families": results, "analog_share": shares}


def _count(rows: dict, key: str) -> tuple:
    ok = sum(r[key] if key == "checkpoints" else 1 for r in rows.values() if not r["reason"])
    total = sum(r[key] if key == "checkpoints" else 1 for r in rows.values())
    return ok, total


def markdown(res: dict, command: str) -> str:
    fams = res["families"]
    lines = ["# Coverage: which timm transformers convert", "",
             f"Measured with `{command}` on {datetime.date.today()}: timm {timm.__version__}, torch {torch.__version__}, "
             f"{platform.machine()}. Every architecture with pretrained weights in timm, built at full size on the meta "
             "device and rewritten exactly as `convert` rewrites it; a pretrained checkpoint counts as converted when "
             "its architecture does. Analog share: the share of the SNN's energy spent in analog operations "
             "(expectation-compensated LayerNorm/GELU/softmax, first layer, product rescaling) on a tiny random "
             "instance of the family (models/families.py), training-free, T=4.", ""]
    for title, group in (("Pure-attention families", PURE_ATTENTION), ("Hybrid and hierarchical families", HYBRID)):
        group = [f for f in group if f in fams]
        if not group:
            continue
        a_ok = sum(_count(fams[f], "arch")[0] for f in group)
        a_all = sum(_count(fams[f], "arch")[1] for f in group)
        c_ok = sum(_count(fams[f], "checkpoints")[0] for f in group)
        c_all = sum(_count(fams[f], "checkpoints")[1] for f in group)
        lines += [f"## {title}: {c_ok} of {c_all} pretrained checkpoints ({100 * c_ok / max(1, c_all):.1f}%), "
                  f"{a_ok} of {a_all} architectures", "",
                  "| family | architectures | checkpoints | analog share (tiny instance) |", "|---|---|---|---|"]
        for f in group:
            (ao, at), (co, ct) = _count(fams[f], "arch"), _count(fams[f], "checkpoints")
            shares = res["analog_share"].get(f, {})
            share = ", ".join(f"{100 * v:.0f}% ({k})" for k, v in shares.items()) or "-"
            lines.append(f"| {f} | {ao} / {at} | {co} / {ct} | {share} |")
        lines.append("")
    total = [_count(fams[f], "checkpoints") for f in fams]
    lines += [f"All families: **{sum(o for o, _ in total)} of {sum(t for _, t in total)} pretrained checkpoints "
              f"({100 * sum(o for o, _ in total) / max(1, sum(t for _, t in total)):.1f}%)**.", "",
              "## What does not convert, and why", ""]
    failures = [(f, a, r) for f, rows in fams.items() for a, r in rows.items() if r["reason"]]
    if not failures:
        lines.append("Nothing: every architecture listed converts.")
    for f, a, r in failures:
        lines.append(f"- `{a}` ({f}, {r['checkpoints']} checkpoints): {r['reason']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="COVERAGE.md")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", default=str(COVERAGE_TABLE),
                        help="where the arch -> reason table for `python -m convert --list-models` goes "
                             "(written by full runs over all families only)")
    parser.add_argument("--families", nargs="*", default=list(PURE_ATTENTION + HYBRID))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families) - set(PURE_ATTENTION + HYBRID))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}: use some of {', '.join(PURE_ATTENTION + HYBRID)}")
    res = run(args.families, args.quick)
    command = "python -m benchmarks.coverage" + (" --quick" if args.quick else "")
    write_whole(Path(args.out), markdown(res, command))
    print(f"wrote {args.out}")
    if not args.quick and set(args.families) == set(PURE_ATTENTION + HYBRID):
        table = {"timm": timm.__version__, "date": str(datetime.date.today()),
                 "architectures": {a: r["reason"] for rows in res["families"].values() for a, r in rows.items()}}
        write_whole(Path(args.table), json.dumps(table, indent=0, sort_keys=True))
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
