"""The benchmarks cannot rot: the torchvision port is exact, and the quick modes run end to end."""
from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from benchmarks import energy as energy_bench
from benchmarks import finetune as ft_bench
from benchmarks import peers
from models.torchvision_port import to_torchvision
from models.zoo import create_ann
from tests.conftest import build


@pytest.mark.parametrize("model", ["vit_fmnist", "cls_token", "no_qkv_bias_rejected"])
def test_torchvision_port_reproduces_the_ann(model):
    ann = create_ann("vit_fmnist") if model == "vit_fmnist" else build("cls_token")
    if model == "no_qkv_bias_rejected":
        with pytest.raises(ValueError, match="cannot port to torchvision"):
            to_torchvision(build("no_qkv_bias"))
        return
    x = torch.randn(8, *((1, 28, 28) if model == "vit_fmnist" else (3, 16, 16)))
    with torch.no_grad():
        torch.testing.assert_close(to_torchvision(ann)(x), ann(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config, message", [("qk_norm", "plain pre-norm block"), ("layer_scale", "plain pre-norm"),
                                             ("avg_pool_no_cls", "no class-token pooling"),
                                             ("register_tokens", "register tokens"), ("pre_norm", "fc-norm"),
                                             ("gelu_tanh", "exact GELU")])
def test_torchvision_port_names_what_differs(config, message):
    with pytest.raises(ValueError, match=message):
        to_torchvision(build(config))


@pytest.mark.parametrize("T", [1, 3])
def test_spikingjelly_energy_matches_a_hand_count(T):
    """sta_energy on a depth-1 ViT: SOPs are the encoders' counts times the fan-out of the layer each one feeds
    (q/k/v, fc1, fc2, the head through the class token); MACs the patch embedding once (the image arrives at step
    1 only), the attention's products, softmax and output projection and LayerNorm/GELU at every step."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import Converter, STATransformerRecipe
    from torch.utils.data import DataLoader, TensorDataset
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    C, H, heads, N, B = 16, 32, 2, 17, 4
    ann = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=C, depth=1,
                            num_heads=heads, mlp_ratio=H / C).eval()
    x = torch.randn(32, 1, 28, 28)
    recipe = STATransformerRecipe(dataloader=DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)),
                                                        batch_size=16), time_steps=T, mode="spiking_encoder",
                                  threshold_mode="mse", threshold_scale=0.5)
    snn = Converter(recipe=recipe, device=torch.device("cpu")).convert(to_torchvision(ann)).eval()
    functional.set_step_mode(snn, "m")
    fan_out = {"encoder.layers.encoder_layer_0.ln_1_sta_encoder": 3 * C, "encoder.layers.encoder_layer_0.ln_2_sta_"
               "encoder": H, "encoder.layers.encoder_layer_0.mlp.1_sta_encoder": C, "encoder.ln_sta_encoder": 10}
    levels = {}
    hooks = [snn.get_submodule(n).register_forward_hook(
        lambda m, i, out, n=n: levels.__setitem__(n, torch.round(out / m.v_threshold).abs())) for n in fan_out]
    with torch.no_grad():
        peers.sta_forward(snn, x[:B], T)
    for h in hooks:
        h.remove()
    levels["encoder.ln_sta_encoder"] = levels["encoder.ln_sta_encoder"][:, :, :1]  # the head reads the class token
    sops = sum(float(k.sum()) * fan_out[n] for n, k in levels.items())
    strict_sops = sum(float(k[k <= 1].sum()) * fan_out[n] for n, k in levels.items())
    strict_macs = sum(float((k > 1).sum()) * fan_out[n] for n, k in levels.items())
    macs = B * 16 * C * 49 + T * B * (2 * N * N * C + heads * N * N + N * C * C + 3 * N * C + N * H)
    e = peers.sta_energy(snn, x[:B], T)
    assert e["sops"] == pytest.approx(sops / B) and e["macs"] == pytest.approx(macs / B)
    assert e["strict_sops"] == pytest.approx(strict_sops / B)
    assert e["strict_macs"] == pytest.approx((macs + strict_macs) / B)
    assert strict_macs > 0 and e["energy_pj"] == pytest.approx(e["macs"] * 4.6 + e["sops"] * 0.9)


def test_peers_quick_runs_and_renders():
    res = peers.run(eval_images=64, steps=(2,))
    sj, ours = res["sj"][2], res["ours"]["signed IF L=1 (defaults)"]
    # the STA recipe is a working conversion of the same weights (its alphabet is unbounded: ~30 per step)
    assert abs(sj["top1"] - ours["ann_top1"]) <= 10 and sj["alphabet"] > 1 and sj["events_per_neuron_step"] > 0
    assert ours["alphabet"] == 1  # signed IF L=1: k in {-1, 0, 1}
    assert res["ours"]["multi-threshold N=8"]["alphabet"] <= 128 and res["port_max_abs_error"] < 1e-4
    md = peers.markdown(res, "test")
    assert md.startswith(peers.BEGIN) and "| SpikingJelly STA |" in md and md.rstrip().endswith(peers.END)


def test_speed_peer_timing_runs():
    """``benchmarks.speed --peer-images``: our whole anytime curve against SpikingJelly's single T on the same
    images, both classifying them."""
    from benchmarks import speed
    res = speed.peer_timing(8, T=2)
    assert res["images"] == 8 and res["T"] == 2 and res["ours_curve_s"] > 0 and res["spikingjelly_evaluate_s"] > 0
    assert 0 <= res["ours_top1_at_T"] <= 100 and 0 <= res["spikingjelly_top1"] <= 100
    assert res["ratio"] == res["ours_curve_s"] / res["spikingjelly_evaluate_s"]


def test_finetune_quick_runs_and_renders():
    res = ft_bench.run(eval_images=64, train_images=64, epochs=1, steps=(2,), variant_t=2,
                       variants={"ecm (default)": {}, "ssa": dict(attention="ssa")}, max_t=2)
    assert set(res["defaults"]) == {2} and set(res["variants"]) == {"ecm (default)", "ssa"}
    assert res["defaults"][2]["seconds_per_epoch"] > 0
    md = ft_bench.markdown(res, "test")
    assert md.startswith(ft_bench.BEGIN) and "| ssa |" in md


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1, max_size=30))
def test_pareto_front_keeps_exactly_the_undominated_points(pairs):
    points = [{"top1": a, "energy": e} for a, e in pairs]
    edge = energy_bench.front(points, "energy")
    dominates = lambda q, p: q["top1"] >= p["top1"] and q["energy"] <= p["energy"] and q != p  # noqa: E731
    for p in points:
        assert (p in edge) == (not any(dominates(q, p) and (q["top1"], q["energy"]) != (p["top1"], p["energy"])
                                       for q in points))
    assert [p["energy"] for p in edge] == sorted(p["energy"] for p in edge)


def test_energy_quick_runs_and_renders():
    grid = {"rate, signed IF L=1": ({}, (4,)), "differential, signed IF L=2": (dict(coding="differential", levels=2), (2,))}
    res = energy_bench.measure(["vit_fmnist"], grid, eval_images=64, energy_images=8)
    points = res["models"]["vit_fmnist"]["points"]
    assert len(points) == 2 and all(p["strict"] >= p["energy"] > 0 for p in points)
    tuned = energy_bench.measure_finetuned(["vit_fmnist"], ["event penalty 30"], 64, 8, train_images=64, epochs=(1,))
    rows = tuned["models"]["vit_fmnist"]["event penalty 30"]
    assert [(p["T"], p["epochs"]) for p in rows] == [(4, 1)] and rows[0]["seconds"] > 0
    energy_bench.merge(res, "finetuned", tuned, {"command": "c", "date": "d"})
    energy_bench.merge(res, "peer", energy_bench.measure_peer(["vit_fmnist"], 64, 8, steps=(2,)), {"command": "c", "date": "d"})
    peer = res["models"]["vit_fmnist"]["peer"]
    energy_bench.figure(res)
    md = energy_bench.markdown(res, "test")
    assert md.startswith(energy_bench.BEGIN) and md.rstrip().endswith(energy_bench.END) and "| rate, signed IF L=1 | 4 |" in md
    assert "| rate, signed IF L=1 | 4 | event penalty 30 | 1 |" in md and f"{energy_bench.PEER} on the same weights" in md
    assert not re.search(r"\{[a-z_]+\[", md)  # every placeholder filled in (no f missing before a string)
    assert 0 < peer[energy_bench.PEER][0]["energy"] < 100 and 0 < peer[energy_bench.PEER][0]["strict"] < 100


def test_recipes_quick_runs_and_renders():
    from benchmarks import recipes
    res = recipes.measure(["vit_fmnist"], {"labels (defaults)": ({}, {})}, steps=2, eval_images=64)
    row = res["models"]["vit_fmnist"]["recipes"]["labels (defaults)"]
    assert row["seconds"] > 0 and row["after"]["strict"] >= row["after"]["energy"] > 0
    assert 0 <= res["models"]["vit_fmnist"]["start_agreement"] <= 1
    md = recipes.markdown(res, "test")
    assert md.startswith(recipes.BEGIN) and md.rstrip().endswith(recipes.END) and "| labels (defaults) |" in md


def test_recipes_over_t_arranges_each_t_and_marks_the_best_gain(monkeypatch):
    from benchmarks import recipes

    def fake(models, chosen, steps, eval_images, timesteps):  # gain 10 T + i for the i-th recipe
        row = lambda i: {"before": {"top1": 50.0, "ann_top1": 90.0}, "after": {"top1": 50.0 + 10 * timesteps + i}}
        return {"date": "today", "machine": "test", "images": eval_images, "steps": steps,
                "models": {m: {"ann_top1": 90.0, "recipes": {r: row(i) for i, r in enumerate(chosen)},
                               "start_agreement": 0.45 * timesteps} for m in models}}
    monkeypatch.setattr(recipes, "measure", fake)
    chosen = {r: recipes.RECIPES[r] for r in ("labels, lr 1e-3", "labels, lr 3e-4")}
    res = recipes.measure_over_t(["a", "b"], chosen, 3, 8, [1, 2])
    assert res["timesteps"] == [1, 2] and list(res["models"]) == ["a", "b"]
    assert res["models"]["b"]["recipes"]["labels, lr 3e-4"]["2"]["after"]["top1"] == 71.0
    md = recipes.markdown(res, "cmd")
    assert md.startswith(recipes.BEGIN_OVER_T) and md.rstrip().endswith(recipes.END_OVER_T)
    assert "| labels, lr 1e-3 | 50.00 -> 60.00 (+10.00) | 50.00 -> 70.00 (+20.00) |" in md
    assert "| labels, lr 3e-4 | 50.00 -> 61.00 (**+11.00**) | 50.00 -> 71.00 (**+21.00**) |" in md
    assert "| default (lr null): agreement -> lr | 45.0% -> 1.0e-03 | 90.0% -> 5.0e-04 |" in md


def test_recipes_over_t_joins_the_saved_rows_of_the_same_t_steps_and_images(tmp_path):
    from benchmarks import recipes
    row = lambda top1: {"1": {"before": {"top1": 50.0}, "after": {"top1": top1}}}
    run = lambda date, rows: {"date": date, "machine": "test", "timesteps": [1], "steps": 3, "images": 8,
                              "models": {"a": {"ann_top1": 90.0, "recipes": rows, "start_agreement": {"1": 0.5}}}}
    saved = tmp_path / "recipes-over-t.json"
    assert recipes.saved_over_t(saved, [1], 3, 8) is None
    saved.write_text(json.dumps({**run("old", {"labels, lr 1e-4": row(60.0), "labels, lr 1e-3": row(61.0)}),
                                 "command": "python -m benchmarks.recipes --recipes old"}))
    res = recipes.joined(run("new", {"labels, lr 1e-3": row(62.0), "labels (defaults)": row(63.0)}),
                         recipes.saved_over_t(saved, (1,), 3, 8))
    got = res["models"]["a"]["recipes"]
    assert list(got) == ["labels (defaults)", "labels, lr 1e-3", "labels, lr 1e-4"]  # RECIPES' order
    assert [got[r]["1"]["after"]["top1"] for r in got] == [63.0, 62.0, 60.0]  # a remeasured recipe is replaced
    assert [r["date"] for r in res["runs"]] == ["old", "new"]
    md = recipes.markdown(res, res["runs"][-1]["command"])
    assert "`python -m benchmarks.recipes --recipes old` on old and `" in md
    for other in ([[2], 3, 8], [[1], 4, 8], [[1], 3, 9]):  # a run that would replace the saved rows is refused
        with pytest.raises(SystemExit, match="--out DIR to keep them apart"):
            recipes.saved_over_t(saved, *other)


def test_a_rerun_of_the_same_command_replaces_its_run():
    from benchmarks.core import with_run
    runs = [{"command": "a", "date": "1"}, {"command": "b", "date": "2"}]
    assert with_run(runs, {"command": "a", "date": "3"}) == [runs[1], {"command": "a", "date": "3"}]
    assert with_run(runs, {"command": "c", "date": "3"}) == runs + [{"command": "c", "date": "3"}]


def test_psa_quick_runs_and_renders(tmp_path_factory, monkeypatch):
    from benchmarks import psa
    res = psa.measure(["vit_fmnist"], [2], (0.5,), eval_images=32)
    rows = res["models"]["vit_fmnist"]["rows"]
    assert [(r["mask_p"], r["masks"]) for r in rows] == [(0.0, "-")] + [(0.5, name) for name in psa.MASKS]
    assert rows[0]["qk_vs_ecm"] == 1.0 and rows[1]["qk_vs_ecm"] == pytest.approx(0.5, abs=0.12)  # each operand's events x (1 - p)
    for r in rows[1:]:  # Q K^T's events fall by p for each of its operands masked: half of it for Q alone
        masked = [n for n in psa.MASKS[r["masks"]].get("mask_operands", "q+k+attn").split("+") if n in ("q", "k")]
        assert r["qk_vs_ecm"] == pytest.approx(1 - 0.5 * len(masked) / 2, abs=0.12), r["masks"]
    md = psa.markdown(res, "test")
    assert md.startswith(psa.BEGIN) and md.rstrip().endswith(psa.END) and "| 2 | 0.5 | Q, K; even; rescaled |" in md
    # a run on another model keeps the saved model's results, each model with its own run
    import argparse
    import json
    saved = {**res, "command": "python -m benchmarks.psa", "date": "then", "images": 32}
    tmp = tmp_path_factory.mktemp("psa")
    (tmp / "psa.json").write_text(json.dumps(saved))
    other = {**res, "date": "now", "images": 16, "models": {"vit_fmnist_gap": res["models"]["vit_fmnist"]}}
    monkeypatch.setattr(psa, "measure", lambda *args: json.loads(json.dumps(other)))
    args = argparse.Namespace(models=["vit_fmnist_gap"], timesteps=[2], eval_images=16, out=tmp, mask_p=[0.5],
                              masks=None, mask_seeds=1)
    both = psa.measure_keeping_others(args)
    assert list(both["models"]) == ["vit_fmnist", "vit_fmnist_gap"]
    assert [(r["date"], r["images"]) for r in (psa._runs(m, both)[-1] for m in both["models"].values())] == \
        [("then", 32), ("now", 16)]
    md = psa.markdown(both, "latest")
    assert "`python -m benchmarks.psa` on then, 32 test images" in md and "on now, 16 test images" in md
    # more draws of one setting on the same test images: its row is replaced by their mean, the others stay
    (tmp / "psa.json").write_text(json.dumps(both))
    monkeypatch.undo()
    monkeypatch.setattr(psa, "command_line", lambda module: f"python -m {module} --mask-seeds 2")
    name = "Q, K; even; rescaled; fan-out"
    seeded = psa.measure_keeping_others(argparse.Namespace(**{**vars(args), "models": ["vit_fmnist"],
                                                              "eval_images": 32, "masks": [name], "mask_seeds": 2}))
    new_rows = seeded["models"]["vit_fmnist"]["rows"]
    assert [(r["mask_p"], r["masks"]) for r in new_rows] == [(r["mask_p"], r["masks"]) for r in rows]
    draws = [r for r in new_rows if "draws" in r]
    assert [r["masks"] for r in draws] == [name] and len(draws[0]["draws"]) == 2
    assert draws[0]["top1"] == pytest.approx(sum(draws[0]["draws"]) / 2)
    assert all(a == b for a, b in zip(new_rows, rows) if a["masks"] not in ("-", name))
    assert [r["command"] for r in seeded["models"]["vit_fmnist"]["runs"]] == \
        ["python -m benchmarks.psa", "python -m benchmarks.psa --mask-seeds 2"]
    assert "mean of 2 draws" in psa.markdown(seeded, "latest")


def test_softmax_free_quick_runs_and_renders(monkeypatch):
    from benchmarks import softmax_free as sf
    from benchmarks import recipes
    images = sf.calibration_images(64)
    monkeypatch.setattr(sf, "calibration_images", lambda: images)
    monkeypatch.setattr(recipes, "calibration_images", lambda: images)
    monkeypatch.setattr(sf, "ABLATION", {"labels": ({}, {})})
    res = {"date": "today", "machine": "test", "model": sf.MODEL, "ablation": sf.ablation(["ssa"], 1, 50),
           "epochs": sf.epochs_run(["ssa"], 1, 50, train_images=64, points=(1,)),
           "shares": sf.analog_shares(["ssa", "spike_driven, constant norm"], (2,))}
    shares = res["shares"]["variants"]
    assert shares["spike_driven, constant norm"]["2"]["norms"] == 0 < shares["ssa"]["2"]["norms"]
    assert all(r["image layer"] + r["norms"] + r["other"] == pytest.approx(r["analog_share"])
               for rows in shares.values() for r in rows.values())
    points = res["epochs"]["variants"]["ssa"]["points"]
    assert set(points) == {"0", "1"} and 0 <= points["1"]["analog_share"] < 1
    md = sf.markdown(res, "test")
    assert md.startswith(sf.BEGIN) and md.rstrip().endswith(sf.END) and "| ssa | labels |" in md
    assert "| spike_driven, constant norm | 2 |" in md


@pytest.mark.parametrize("render", [False, True])
def test_benchmark_command_line_writes_results_section_and_plot(tmp_path, monkeypatch, render):
    """A measurement keeps its results and writes the section and the plot; --render redraws both from the
    saved results without measuring."""
    import json
    import sys

    from benchmarks.outputs import benchmark_main
    out, md = tmp_path / "results", tmp_path / "B.md"
    out.mkdir()
    if render:
        (out / "toy.json").write_text(json.dumps({"value": 7, "command": "python -m benchmarks.toy"}))
    measured = []

    def run(args):
        measured.append(1)
        return {"value": 3}

    def plot(res, args):
        (args.out / "toy.png").write_text(str(res["value"]))

    monkeypatch.setattr(sys, "argv", ["toy", "--out", str(out), "--markdown", str(md)] + ["--render"] * render)
    benchmark_main("toy", "Toy.", run, run, lambda res, cmd: f"<!-- a -->\n{res['value']} {cmd}\n<!-- b -->\n",
                   plot=plot)
    value = "7" if render else "3"
    assert measured == ([] if render else [1]) and (out / "toy.png").read_text() == value
    assert f"{value} python -m benchmarks.toy" in md.read_text() and json.loads((out / "toy.json").read_text())


@pytest.mark.parametrize("data", ["new text", b"new bytes"])
def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch, data):
    """write_whole replaces a file in one rename; a write that fails half way leaves the old file whole."""
    from pathlib import Path

    from benchmarks.core import write_whole
    path = tmp_path / "results.json"
    path.write_text("old")
    write_whole(path, data)
    assert (path.read_bytes() if isinstance(data, bytes) else path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

    def half(self, d):  # the disk fills after the first byte
        open(self, "wb").write(d[:1] if isinstance(d, bytes) else d[:1].encode())
        raise OSError("No space left on device")
    monkeypatch.setattr(Path, "write_text", half)
    monkeypatch.setattr(Path, "write_bytes", half)
    with pytest.raises(OSError):
        write_whole(path, data * 2)
    assert (path.read_bytes() if isinstance(data, bytes) else path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the half-written temporary file is gone


def test_generalization_measures_options_beside_the_defaults(tmp_path, monkeypatch, capsys):
    import json
    from benchmarks import generalization as gen
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    monkeypatch.setattr(gen, "calibration_images", lambda real=gen.calibration_images: real(64))
    md = tmp_path / "BENCHMARKS.md"
    common = ["--models", "vit_fmnist", "--eval-images", "16", "--timesteps", "2", "--levels", "1",
              "--benchmarks-md", str(md)]
    assert gen.main(common + ["--option", "attention_map=softmax"]) == 0
    assert gen.main(common) == 0  # the defaults' run keeps the options' entry, and comes first
    res = json.loads((tmp_path / "generalization.json").read_text())
    assert list(res["models"]) == ["vit_fmnist", "vit_fmnist with attention_map=softmax"]
    with_options = res["models"]["vit_fmnist with attention_map=softmax"]
    assert with_options["options"] == {"attention_map": "softmax"} and "percentile_L1" not in with_options
    default_cell = res["models"]["vit_fmnist"]["defaults"]["L=1"]["2"]["top1"]
    ann = res["models"]["vit_fmnist"]["ann_top1"]
    text = md.read_text()
    assert "**vit_fmnist with attention_map=softmax**" in text and "In brackets: the defaults' cell" in text
    assert f"({ann - default_cell:+.2f})" in text.split("with attention_map=softmax**")[1]
    for bad, message in (("attention_map=maybe", "unknown attention.map 'maybe'"), ("attn_map=softmax", "attention_map"),
                         ("attention_map", "'attention_map'")):
        with pytest.raises(SystemExit):
            gen.main(common + ["--option", bad])
        assert message in capsys.readouterr().err


def test_generalization_add_keeps_the_saved_cells(tmp_path, monkeypatch, capsys):
    import sys
    from benchmarks import generalization as gen
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    monkeypatch.setattr(gen, "calibration_images", lambda real=gen.calibration_images: real(64))
    md = tmp_path / "BENCHMARKS.md"
    common = ["--models", "vit_fmnist", "--eval-images", "16", "--benchmarks-md", str(md)]
    with pytest.raises(SystemExit):  # nothing saved to add to
        gen.main(common + ["--timesteps", "2", "--levels", "1", "--add"])
    assert "no saved entry for vit_fmnist" in capsys.readouterr().err
    assert gen.main(common + ["--timesteps", "2", "--levels", "1"]) == 0
    first = json.loads((tmp_path / "generalization.json").read_text())["models"]["vit_fmnist"]
    add = common + ["--timesteps", "1", "--levels", "1", "4", "--add"]
    monkeypatch.setattr(sys, "argv", ["generalization"] + add)  # the command the entry records
    assert gen.main(add) == 0
    entry = json.loads((tmp_path / "generalization.json").read_text())["models"]["vit_fmnist"]
    assert entry["defaults"]["L=1"]["2"] == first["defaults"]["L=1"]["2"]  # kept, not rerun
    assert set(entry["defaults"]["L=1"]) == {"1", "2"} and set(entry["defaults"]["L=4"]) == {"1"}
    assert entry["percentile_L1"] == first["percentile_L1"] and entry["convert_s"]["percentile"] == \
        first["convert_s"]["percentile"]
    assert len(entry["runs"]) == 2 and entry["runs"][1][0].endswith("--add")
    assert entry["runs"][1][0] in md.read_text()
    entry["runs"][0][1] = "2000-01-01"  # runs of other days: each command with its date
    assert f"`{entry['runs'][0][0]}` (2000-01-01), `{entry['runs'][1][0]}` ({entry['runs'][1][1]})" in \
        gen.markdown({"models": {"vit_fmnist": entry}})
    with pytest.raises(SystemExit):  # cells on other test images do not mix
        gen.main(["--models", "vit_fmnist", "--eval-images", "8", "--timesteps", "4", "--levels", "1", "--add",
                  "--benchmarks-md", str(md)])
    assert "use --eval-images 16" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["cls_token", "avg_pool_no_cls", "register_tokens"])
def test_error_sources_group_every_neuron_once_and_leave_them_spiking(config, images):
    from benchmarks import error_sources as es
    from convert import convert
    from convert.evaluate import evaluate
    from models.neurons import BaseNeuron
    ann = build(config)
    snn = convert(ann, images, timesteps=4, progress=False)
    groups = es.neuron_groups(snn.net)
    neurons = [m for m in snn.modules() if isinstance(m, BaseNeuron)]
    assert sorted(map(id, neurons)) == sorted(id(n) for ns in groups.values() for n in ns)
    assert all(not any(p.isdigit() for p in g.split(".")) for g in groups)
    with torch.no_grad():
        labels = ann(images).argmax(-1)  # the ANN is right on every image
    loader = [(images, labels)]
    assert es.top1_with_spiking(snn, ann, loader, 4, []) == 100.0  # nothing spiking: the ANN itself
    # an analog neuron among spiking ones is exactly the identity, an unsigned one too (its inputs, the steps of
    # an expectation-compensated softmax, go negative)
    analog = groups["blocks.attn.attend.attn_neuron"]
    seen = []
    hooks = [n.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone()))) for n in analog]
    es.top1_with_spiking(snn, ann, loader, 4, [n for ns in groups.values() for n in ns if n not in analog])
    for h in hooks:
        h.remove()
    assert seen and all(torch.equal(i, o) for i, o in seen) and any((i < 0).any() for i, _ in seen)
    res = es.sources(snn, ann, loader, 4)
    assert set(res["groups"]) == set(groups) and res["ann"] == 100.0
    assert not any(n.analog for n in neurons)  # every evaluation leaves the network spiking
    assert res["spiking"] == evaluate(snn, loader, 4, progress=False)["top1"][-1]


def test_error_sources_quick_runs_and_renders():
    from benchmarks import error_sources as es
    res = es.measure(["vit_fmnist"], 2, 64, {"levels": 2})
    r = res["models"]["vit_fmnist"]
    assert "blocks.attn.attend.attn_neuron" in r["groups"] and r["groups"]["blocks.mlp.fc1.neuron"]["neurons"] == 4
    assert all(0 <= v["alone"] <= 100 and 0 <= v["all_but"] <= 100 for v in r["groups"].values())
    md = es.markdown(json.loads(json.dumps(res)), "test")
    assert md.startswith(es.BEGIN) and md.rstrip().endswith(es.END) and "| blocks.attn.attend.attn_neuron |" in md
    assert "levels=2" in md
