"""torchrun: a 2-process gloo run on CPU gives the single-process thresholds, accuracies and checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from calibration.statistics import RunningHistogram

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--timesteps", "3", "data.eval_images=101", "calibration.num_images=100", "data.download=false",
          "progress=false", "sweep.energy_images=4", "data.batch_size=32"]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _single(*args):
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT)


def _torchrun(*args, nproc=2):
    return subprocess.run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "convert", *args],
                          capture_output=True, text=True, env=_env(), cwd=ROOT)


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    return {k: v for k, v in config.items() if k != "finetune_report"}


@pytest.mark.parametrize("extra", [["calibration.correction=bias", "neuron.levels=2"]], ids=["bias-correction"])
def test_two_processes_equal_one(tmp_path, extra):  # the defaults plus bias correction (its own rank merge)
    one = _single(*COMMON, *extra, "--out", str(tmp_path / "one"))
    two = _torchrun(*COMMON, *extra, "--out", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes" in two.stdout and two.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    a, b = load_file(str(tmp_path / "one" / "snn.safetensors")), load_file(str(tmp_path / "two" / "snn.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metadata(tmp_path / "one" / "snn.safetensors") == _metadata(tmp_path / "two" / "snn.safetensors")
    ra = json.loads((tmp_path / "one" / "report.json").read_text())["variants"]["default"]
    rb = json.loads((tmp_path / "two" / "report.json").read_text())["variants"]["default"]
    assert ra["images"] == rb["images"] == 101  # 101 images over 2 ranks: every image counted once
    for key in ("top1", "top5", "agreement", "ann_top1", "calibration"):
        assert ra[key] == rb[key], key


def test_two_process_finetuning_matches_one(tmp_path):
    """DDP averages the gradients over ranks: after one step the 2-process weights differ from the 1-process
    ones by far less than the step itself (AdamW's first step is lr * sign(gradient): only gradients that
    round to the other sign differ; ranks that each trained on their half batch differ on a large share).
    One step, because a spiking network amplifies rounding: later steps see other spikes. The default rate
    (lr null) comes from the agreement with the ANN summed over the ranks' halves: the one process's."""
    ft = ["finetune=bptt", "finetune.images=32", "finetune.batch_size=32"]
    start = _single(*COMMON, "--out", str(tmp_path / "start"))
    one = _single(*COMMON, *ft, "--out", str(tmp_path / "one"))
    two = _torchrun(*COMMON, *ft, "--out", str(tmp_path / "two"))
    assert start.returncode == 0 and one.returncode == 0 and two.returncode == 0, \
        (start.stderr[-1500:], one.stderr[-1500:], two.stderr[-1500:])
    a0, a, b = (load_file(str(tmp_path / run / "snn.safetensors")) for run in ("start", "one", "two"))
    report = json.loads((tmp_path / "two" / "report.json").read_text())["variants"]["default"]["finetune"]
    alone = json.loads((tmp_path / "one" / "report.json").read_text())["variants"]["default"]["finetune"]
    assert report["steps"] == 1 and report["complete"]
    assert 0 <= report["start_agreement"] == alone["start_agreement"] <= 1
    assert report["options"]["lr"] == alone["options"]["lr"]
    update = torch.sqrt(sum(((a[k] - a0[k]).double() ** 2).sum() for k in a))
    apart = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a))
    assert update > 1e-2 and apart < 1e-2 * update, (float(apart), float(update))


def test_ranks_that_disagree_on_the_config_stop(tmp_path):
    res = _torchrun(*COMMON, "seed=${oc.env:RANK}", "--out", str(tmp_path / "o"))
    assert res.returncode != 0
    # torchrun stops the other rank as soon as one exits, so one or both print their line
    # torchrun stops the other rank as soon as one exits, so one or both print their line
    ours = [line for line in res.stderr.splitlines() if line.startswith("rank ")]
    assert ours and all("ranks disagree on the config: rank(s) 1 differ from rank 0" in o for o in ours)
    assert str(ROOT / "convert") not in res.stderr  # one line per rank; the traceback below is torchrun's own
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_more_processes_than_batches(tmp_path):
    res = _torchrun(*COMMON[:1], "3", "data.eval_images=20", "calibration.num_images=100", "data.download=false",
                    "progress=false", "data.batch_size=32", "--out", str(tmp_path / "o"))
    assert res.returncode != 0
    assert "20 evaluation images in batches of 32 cannot be shared by 2 processes" in res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


class ThreadWorld:
    """``world`` ranks as threads: all_reduce of models.distributed (sum or max), with a barrier, so that the
    real ``RunningHistogram.merge_ranks`` runs on every rank's histogram."""

    def __init__(self, world):
        self.world, self.barrier, self.slots, self.local = world, threading.Barrier(world), [None] * world, threading.local()

    def all_reduce(self, tensor, op="sum"):
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.sum(0) if op == "sum" else stacked.amax(0)
        self.barrier.wait()
        tensor.copy_(result)
        return tensor

    def run(self, fn, args):
        errors = []

        def target(r):
            self.local.rank = r
            try:
                fn(args[r])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self.barrier.abort()
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6), st.integers(1, 4), st.integers(0, 2 ** 16))
def test_histograms_merge_exactly_in_any_split(scales, world, seed):
    """merge_ranks over any split of the batches gives, on every rank, the histogram of all of them in one
    process."""
    import calibration.statistics as stats
    world = min(world, len(scales))
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(16, 5, generator=gen) * s for s in scales]
    whole = RunningHistogram(bins=64, channels=5)
    for b in batches:
        whole.update(b)
    parts = [RunningHistogram(bins=64, channels=5) for _ in range(world)]
    for i, b in enumerate(batches):
        parts[i % world].update(b)
    fake = ThreadWorld(world)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "all_reduce", fake.all_reduce)
        mp.setattr(stats, "world_size", lambda: world)
        fake.run(lambda p: p.merge_ranks(), parts)
    for p in parts:
        assert p.range == whole.range
        for name in ("pos", "neg", "zeros", "max_pos", "max_neg"):
            assert torch.equal(getattr(whole, name), getattr(p, name)), name
