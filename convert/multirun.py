"""``python -m convert -m key=a,b other=x,y``: Hydra multirun over the cartesian product of the overrides.

Hydra's own sweeper expands the overrides and Hydra's launcher runs the jobs: the
``launcher`` config group picks it (``basic``: one after the other on this machine;
``submitit_local`` / ``submitit_slurm``: hydra-submitit-launcher, ``pip install -e .[slurm]``).
Each job is the single-run job writing its run folder ``<sweep dir>/<job number>``; a job
that fails writes ``error.txt`` there and the others go on. Afterwards the sweep folder
gets ``sweep.csv`` (every job's accuracy at every t, with its overrides), ``sweep.png``
and ``summary.json``.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, List

import hydra
from omegaconf import DictConfig

from convert.config import compose_config

PLUGIN_LAUNCHERS = {"submitit_slurm", "submitit_local"}


def check_launcher(overrides: List[str]) -> None:
    """A plugin launcher needs its package: say which one to install."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "launcher" and value in PLUGIN_LAUNCHERS \
                and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            raise ValueError(f"launcher={value} needs the Hydra submitit plugin: pip install hydra-submitit-launcher "
                             f"(or pip install -e '.[slurm]')")


def expand(overrides: List[str]) -> List[List[str]]:
    """The jobs Hydra's basic sweeper makes of ``overrides`` (each composed once here to catch mistakes early)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from convert.run import check_config
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # hydra's grammar errors carry the bad override
        raise ValueError(f"bad multirun override: {' '.join(str(exc).split())[:300]}") from None
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs:
        check_config(compose_config(job))
    return jobs


@hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    """One job of the sweep: the single run, written to Hydra's job folder; failures are recorded, not raised."""
    from hydra.core.hydra_config import HydraConfig
    from convert.run import run
    out = Path(HydraConfig.get().runtime.output_dir)
    cfg.out = str(out)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError) as exc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(f"{exc}\n")
        print(f"error: {exc}", file=sys.stderr)


def multirun(overrides: List[str], out: str = None) -> Path:
    """Run the sweep and write the combined table; returns the sweep folder."""
    check_launcher(overrides)
    overrides = [o for o in overrides if not o.startswith("out=")]
    jobs = expand(overrides)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = Path(out).expanduser() if out else Path("runs") / f"multirun_{stamp}"
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise NotADirectoryError(f"output path {sweep_dir} exists and is not a folder: choose another --out")
    print(f"multirun: {len(jobs)} job(s) into {sweep_dir}/")
    argv = sys.argv
    sys.argv = [argv[0], "--multirun", *overrides, f"hydra.sweep.dir={sweep_dir.absolute()}",
                "hydra.sweep.subdir=${hydra.job.num}"]
    try:
        _job()
    finally:
        sys.argv = argv
    summarize(sweep_dir, jobs)
    return sweep_dir


def summarize(sweep_dir: Path, jobs: List[List[str]]) -> Dict:
    """sweep.csv / sweep.png / summary.json over every job folder of the sweep."""
    from convert.plots import png_bytes, sweep_figure
    from convert.run import csv_bytes, write_files
    rows, summary, ann = [], {}, None
    common = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    for num, job in enumerate(jobs):
        folder = sweep_dir / str(num)
        name = " ".join(o for o in job if o not in common) or "defaults"  # the swept values
        if (folder / "report.json").is_file():
            report = json.loads((folder / "report.json").read_text())
            ann = report["ann_top1"] if ann is None else ann
            for variant, res in report["variants"].items():
                label = name if len(report["variants"]) == 1 else f"{name} [{variant}]"
                rows += [{"job": num, "overrides": label, "variant": variant, "t": t + 1, "top1": res["top1"][t],
                          "top5": res["top5"][t], "agreement": res["agreement"][t]} for t in range(len(res["top1"]))]
                summary[label] = {"job": num, "top1_at_T": res["top1"][-1], "ann_top1": res["ann_top1"]}
        else:
            error = (folder / "error.txt").read_text().strip() if (folder / "error.txt").is_file() else "no result"
            summary[name] = {"job": num, "error": error}
    print(f"\n{'job':>4}  {'top-1 at T':>10}  overrides")
    for label, s in summary.items():
        print(f"{s['job']:>4}  {('%.2f%%' % s['top1_at_T']) if 'top1_at_T' in s else 'failed':>10}  {label}"
              + (f"  ({s['error']})" if "error" in s else ""))
    files = {"summary.json": json.dumps(summary, indent=2).encode()}
    if rows:
        files["sweep.csv"] = csv_bytes(rows)
        plot_rows = [{**r, "variant": r["overrides"]} for r in rows]
        files["sweep.png"] = png_bytes(sweep_figure(plot_rows, ann, "multirun"))
    write_files(sweep_dir, files)
    print(f"wrote {sweep_dir}/sweep.csv, sweep.png, summary.json")
    return summary
