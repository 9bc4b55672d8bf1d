"""Reliability matrix: every bad input gets one line naming the problem, exit status 2 and no output files;
untrusted files never run code; interruptions stop cleanly and resume; runs are deterministic.

RELIABILITY.md lists every case id of CASES with its answer (a test checks that it does)."""
from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from convert import convert, load, save
from convert.cli import main
from models.zoo import create_ann
from tests.conftest import build

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--timesteps", "2", "data.download=false", "progress=false", "data.eval_images=16",
        "calibration.num_images=16", "sweep.energy_images=4"]


class Evil:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _snn_checkpoint(tmp):
    x = torch.randn(4, 1, 28, 28)
    return save(convert(create_ann("vit_fmnist"), x, timesteps=2, progress=False), tmp / "snn.safetensors")


def _rgb_folder(tmp, corrupt=False):
    root = tmp / "imagenet"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
            if corrupt:
                (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _nan_weights(tmp):
    state = {k: v.clone().contiguous() for k, v in create_ann("vit_fmnist").state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(tmp / "nan.safetensors"))
    return tmp / "nan.safetensors"


def _truncated(path, tmp):
    out = tmp / f"truncated-{path.name}"
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def _newer(tmp):
    from safetensors import safe_open
    path = _snn_checkpoint(tmp)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp / "newer.safetensors"), metadata={**meta, "version": "99"})
    return tmp / "newer.safetensors"


def _foreign(tmp):
    save_file({k: v.contiguous() for k, v in create_ann("vit_fmnist").state_dict().items()}, str(tmp / "ann.safetensors"))
    return tmp / "ann.safetensors"


def _evil(tmp):
    torch.save({"x": Evil(tmp / "pwned")}, tmp / "evil.pth")
    return tmp / "evil.pth"


def _other_shapes(tmp):
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp / "other.safetensors"))
    return tmp / "other.safetensors"


def _empty(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _empty_imagenet(tmp):
    for split in ("train", "val"):
        (tmp / "inet" / split).mkdir(parents=True)
    return tmp / "inet"


def _a_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file"


# id -> (arguments built from a temporary folder, the message expected on the single stderr line)
CASES = {
    "config-key-typo": (lambda t: ["neuron.levelz=2"], "neuron.levelz"),
    "config-group-typo": (lambda t: ["nueron=if"], "nueron"),
    "config-group-choice": (lambda t: ["neuron=lif"], "Could not find 'neuron/lif'"),
    "wrong-type-int": (lambda t: ["neuron.levels=two"], "neuron.levels"),
    "wrong-type-float": (lambda t: ["calibration.percentile=high"], "calibration.percentile"),
    "timesteps-zero": (lambda t: ["--timesteps", "0"], "must be a positive integer, got 0"),
    "timesteps-negative-override": (lambda t: ["timesteps=-3"], "timesteps must be an integer in 1..65536, got -3"),
    "levels-zero": (lambda t: ["neuron.levels=0"], "neuron.levels must be an integer in 1..1024, got 0"),
    "multi-threshold-levels": (lambda t: ["neuron=multi_threshold", "neuron.levels=40"], "must be in 1..30"),
    "percentile-out-of-range": (lambda t: ["calibration.percentile=101"], "percentile must be a finite number in (0, "
                                                                            "100]"),
    "mask-p-out-of-range": (lambda t: ["attention=psa", "attention.mask_p=1.5"], "attention.mask_p must be a finite"),
    "variant-neuron-clash": (lambda t: ["attention=a2os2a", "neuron.levels=4"], "attention=a2os2a uses binary Q"),
    "finetune-lr": (lambda t: ["finetune=bptt", "finetune.lr=-1"], "finetune.lr must be a finite number in (0, 10]"),
    "finetune-epochs": (lambda t: ["finetune.epochs=-2"], "finetune.epochs must be an integer in 0..100000, got -2"),
    "unknown-model": (lambda t: ["vit_bsae"], "unknown model 'vit_bsae'"),
    "checkpoint-missing": (lambda t: ["--checkpoint", str(t / "none.safetensors")], "does not exist"),
    "checkpoint-truncated": (lambda t: ["--checkpoint", str(_truncated(_foreign(t), t))], "truncated-ann.safetensors"),
    "checkpoint-other-model": (lambda t: ["--checkpoint", str(_other_shapes(t))], "does not fit VisionTransformer"),
    "checkpoint-pickle-code": (lambda t: ["--checkpoint", str(_evil(t))], "weights_only=True"),
    "checkpoint-nan-weights": (lambda t: ["--checkpoint", str(_nan_weights(t))], "non-finite values"),
    "load-missing": (lambda t: ["--load", str(t / "none.safetensors")], "none.safetensors does not exist"),
    "load-truncated": (lambda t: ["--load", str(_truncated(_snn_checkpoint(t), t))], "truncated or corrupt"),
    "load-foreign": (lambda t: ["--load", str(_foreign(t))], "is not a vit-snn SNN checkpoint"),
    "load-newer-format": (lambda t: ["--load", str(_newer(t))], "newer format version"),
    "load-pickle-code": (lambda t: ["--load", str(_evil(t))], "not a readable safetensors file"),
    "data-root-missing": (lambda t: ["--data", str(t / "nowhere")], "does not exist"),
    "data-root-empty": (lambda t: ["--data", str(_empty(t))], "holds no Fashion-MNIST files"),
    "imagefolder-empty": (lambda t: ["data=imagenet", f"data.root={_empty_imagenet(t)}"], "holds no images"),
    "imagefolder-wrong-channels": (lambda t: ["data=imagenet", f"data.root={_rgb_folder(t)}"],
                                   "images have 3 channels but the model expects 1"),
    "imagefolder-corrupt-image": (lambda t: ["data=imagenet", f"data.root={_rgb_folder(t, corrupt=True)}"],
                                  "cannot read image file"),
    "out-is-a-file": (lambda t: ["--out", str(_a_file(t))], "is not a folder"),
    "multirun-bad-value": (lambda t: ["-m", "neuron.levels=1,0"], "neuron.levels must be an integer in 1..1024, got 0"),
    "load-with-checkpoint": (lambda t: ["--load", "a.safetensors", "--checkpoint", "b.safetensors"],
                             "exclude each other"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_matrix(case, tmp_path, capsys):
    build_args, message = CASES[case]
    args = build_args(tmp_path)
    out = tmp_path / "run"
    argv = [*args, *FAST] if "--out" in args else [*args, *FAST, "--out", str(out)]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors exit from inside the parser
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    # nothing written, changed or removed anywhere under the test's folder (the --out given included)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before
    assert not (tmp_path / "pwned").exists()  # nothing in a pickle ever ran


def test_reliability_table_lists_every_case():
    table = (ROOT / "RELIABILITY.md").read_text()
    missing = [case for case in CASES if f"`{case}`" not in table]
    assert not missing, f"RELIABILITY.md lacks {missing}"


def test_load_refuses_a_pickle_that_would_run_code(tmp_path):
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(_evil(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_full_disk_is_reported_and_earlier_outputs_stay(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "snn.safetensors"))

    monkeypatch.setattr("convert.checkpoint.save_file", full)
    capsys.readouterr()
    assert main([*FAST, "--out", str(out), "neuron.levels=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging leftovers, files unchanged


def _cli(*args, **kwargs):
    """The CLI in a child process that answers Ctrl-C as a terminal user's would: a shell starts background jobs
    with SIGINT ignored, which the child would inherit (and then run to the end on SIGINT)."""
    return subprocess.Popen([sys.executable, "-m", "convert", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_interrupted_finetuning_stops_cleanly_and_resumes_exactly(tmp_path, sig=signal.SIGTERM):
    """SIGTERM (a cluster's time limit); SIGINT takes the same path (test_interrupted_run_writes_nothing)."""
    common = [*FAST, "finetune=bptt", "finetune.images=640", "finetune.batch_size=16", "finetune.checkpoint_every=2",
              "finetune.epochs=1"]
    full = tmp_path / "full"
    assert main([*common, "--out", str(full)]) == 0
    run = tmp_path / "run"
    proc = _cli(*common, "--out", str(run))
    ckpt = run / "finetune.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: fine-tuning stopped") and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["finetune.safetensors"]  # no run files, nothing half-written
    assert main([*common, "--out", str(run), f"finetune.resume={ckpt}"]) == 0
    a, b = load_file(str(full / "snn.safetensors")), load_file(str(run / "snn.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_writes_nothing(tmp_path, sig):
    run = tmp_path / "run"
    proc = _cli("--timesteps", "16", "data.download=false", "progress=false", "data.eval_images=3000",
                "--out", str(run))
    first = proc.stdout.readline()  # printed once the model and data are loaded, before calibration
    assert first.startswith("model vit_fmnist"), first
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: the run folder was not written"]
    assert not run.exists() or not any(run.iterdir())


def test_same_seed_same_config_gives_bitwise_identical_outputs(tmp_path):
    for name in ("a", "b"):
        assert main([*FAST, "--out", str(tmp_path / name), "calibration.correction=bias"]) == 0
    a, b = load_file(str(tmp_path / "a" / "snn.safetensors")), load_file(str(tmp_path / "b" / "snn.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "report.json").read_text())["variants"]["default"] for n in "ab")
    assert ra["top1"] == rb["top1"] and ra["calibration"] == rb["calibration"]


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_long_runs_keep_no_state_hooks_or_tensors(step_mode):
    """Many simulations in a row: no hooks left behind, states cleared, no tensors accumulating."""
    x = torch.randn(4, 3, 16, 16)
    snn = convert(build("cls_token"), x, timesteps=4, step_mode=step_mode, progress=False)
    from convert import energy_report
    energy_report(snn, x)
    snn.simulate(x)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    start = live_tensors()
    for _ in range(30):
        snn.simulate(x)
    assert live_tensors() <= start
    for m in snn.net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert getattr(m, "u", None) is None and getattr(m, "sum", None) is None
