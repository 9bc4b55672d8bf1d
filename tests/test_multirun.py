"""Hydra multirun: one run folder per job and a combined sweep table; launcher plugins."""
from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from convert.cli import main

TINY = ["--timesteps", "2", "data.eval_images=32", "calibration.num_images=32", "data.download=false",
        "progress=false", "sweep.energy_images=4"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_multirun_makes_one_folder_per_job_and_a_combined_table(tmp_path):
    out = tmp_path / "sweep"
    assert main(["-m", *TINY, "neuron.levels=1,2", "--out", str(out)]) == 0
    for job, levels in ((0, 1), (1, 2)):
        report = json.loads((out / str(job) / "report.json").read_text())
        assert report["config"]["neuron"]["levels"] == levels
        assert (out / str(job) / "snn.safetensors").is_file()
    rows = _rows(out / "sweep.csv")
    assert {r["overrides"] for r in rows} == {"neuron.levels=1", "neuron.levels=2"} and len(rows) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"neuron.levels=1", "neuron.levels=2"}
    for label, s in summary.items():
        report = json.loads((out / str(s["job"]) / "report.json").read_text())
        assert s["top1_at_T"] == report["variants"]["default"]["top1"][-1]
    assert (out / "sweep.png").stat().st_size > 0


def test_bad_sweep_value_stops_before_any_job(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["-m", *TINY, "neuron.levels=1,0", "--out", str(out)]) == 2
    assert "neuron.levels must be an integer in 1..1024, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert main(["-m", *TINY, "attention=ecm,nope", "--out", str(out)]) == 2
    assert "Could not find 'attention/nope'" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local"])
@pytest.mark.parametrize("multirun", [True, False])
def test_missing_launcher_plugin_names_the_package(monkeypatch, tmp_path, capsys, launcher, multirun):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    args = (["-m"] if multirun else []) + [*TINY, f"launcher={launcher}", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"launcher={launcher} needs the Hydra submitit plugin: pip install hydra-submitit-launcher" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_submitit_local_launcher_runs_the_jobs(tmp_path):  # hydra-submitit-launcher is in the test extra
    out = tmp_path / "sweep"
    assert main(["-m", *TINY, "attention=ecm,psa", "launcher=submitit_local", "--out", str(out)]) == 0
    assert {r["overrides"] for r in _rows(out / "sweep.csv")} == {"attention=ecm", "attention=psa"}
    assert (out / ".submitit").is_dir()
