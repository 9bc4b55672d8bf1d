"""A new user's first hour: an offline answer in seconds, weights from the local cache without network,
progress bars only where they help, the list of models that convert."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from convert.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--timesteps", "2", "data.download=false", "data.eval_images=16", "calibration.num_images=16",
        "sweep.energy_images=4"]
NAME = "test_vit.r160_in1k"  # a tiny timm ViT with a pretrained tag on the Hugging Face Hub
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, like a machine without network


def _image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "a" / "x.png")
    return root


def _offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_ENDPOINT": UNREACHABLE, "PYTHONPATH": str(ROOT)}


def test_offline_without_cached_weights_answers_in_seconds(tmp_path):
    data = _image_folder(tmp_path / "inet")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "convert", NAME, *FAST, "data=imagenet", f"data.root={data}",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                          env=_offline_env(tmp_path), timeout=120)
    seconds = time.time() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: no weights for {NAME}"), proc.stderr
    assert "cannot be reached" in lines[0] and "--checkpoint" in lines[0]
    assert seconds < 15, f"the offline answer took {seconds:.1f} s"
    assert not (tmp_path / "run").exists()


def test_hf_hub_offline_is_answered_without_trying_the_network(tmp_path):
    env = {**_offline_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = f"from models.zoo import create_ann\ncreate_ann({NAME!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "HF_HUB_OFFLINE is set" in proc.stderr.strip().splitlines()[-1]


def test_cached_weights_load_without_network(tmp_path):
    """Weights in the local Hugging Face cache are used as they are: no network, no revision check."""
    weights = {k: v.clone().contiguous() for k, v in timm.create_model(NAME, pretrained=False).state_dict().items()}
    weights = {k: torch.randn_like(v) for k, v in weights.items()}
    repo = tmp_path / "hf" / "hub" / f"models--{timm.models.get_pretrained_cfg(NAME).hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(weights, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    save_file(weights, str(tmp_path / "expected.safetensors"))
    code = (f"import torch\nfrom safetensors.torch import load_file\nfrom models.zoo import create_ann\n"
            f"m = create_ann({NAME!r})\nref = load_file({str(tmp_path / 'expected.safetensors')!r})\n"
            f"assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())\nprint(m.weights_source)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"timm:{NAME}" and time.time() - start < 30


def _bars(text: str) -> bool:
    return "batch/s]" in text or "s/batch]" in text


@pytest.mark.parametrize("override, env, bars", [
    ("progress=true", {}, True),
    ("progress=false", {}, False),
    (None, {}, False),  # the default: stderr is not a terminal here (a batch job's log)
    ("progress=true", {"TQDM_DISABLE": "1"}, False),
])
def test_progress_bars_only_when_asked_or_on_a_terminal(tmp_path, capsys, monkeypatch, override, env, bars):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main([*FAST, "--out", str(tmp_path / "run"), *([override] if override else [])]) == 0
    assert _bars(capsys.readouterr().err) == bars


def test_list_models_reads_the_coverage_table(tmp_path, capsys, monkeypatch):
    import models.zoo as zoo
    table = tmp_path / "coverage.json"
    table.write_text(json.dumps({"timm": "x", "date": "d", "architectures": {
        "vit_tiny_patch16_224": "", "convit_tiny": "refused: the module mutates its state"}}))
    monkeypatch.setattr(zoo, "COVERAGE_TABLE", table)
    assert main(["--list-models", "*tiny*"]) == 0
    out = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines()[:-1])
    assert out["vit_tiny_patch16_224.augreg_in21k_ft_in1k"] == "converts"
    assert out["convit_tiny.fb_in1k"] == "does not convert: refused: the module mutates its state"
    assert out["vit_tiny"].startswith("converts (alias of")
    assert "deit_tiny_patch16_224.fb_in1k" not in out  # not in the table: not listed as converting
    assert main(["--list-models", "vit_fmnist*"]) == 0
    assert "converts (Fashion-MNIST reference, embedded)" in capsys.readouterr().out


def test_the_shipped_coverage_table_matches_timm():
    """Every architecture in models/coverage.json exists in this timm; the embedded default converts."""
    from models.zoo import COVERAGE_TABLE
    archs = json.loads(COVERAGE_TABLE.read_text())["architectures"]
    assert len(archs) > 500 and all(timm.is_model(a) for a in archs)
    assert archs["vit_base_patch16_224"] == "" and archs["eva02_tiny_patch14_224"] == ""


def test_every_reference_model_runs_from_the_cli_on_fashion_mnist(tmp_path):
    """`python -m convert vit_fmnist_gap` (any shipped reference model) uses its own weights and Fashion-MNIST."""
    from models.zoo import ASSETS, FMNIST_MODELS
    shipped = [n for n in FMNIST_MODELS if n != "vit_fmnist" and (ASSETS / f"{n}.safetensors").is_file()]
    assert shipped
    assert main([shipped[0], *FAST, "progress=false", "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["variants"]["default"]["ann_top1"] > 50  # trained weights on the right data, not chance
