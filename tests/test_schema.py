"""The config schema (convert.schema): every key has a rule, and bad values generated from the rules are answered
with one line, exit status 2 and nothing written, within seconds, by the CLI and the Python API alike."""
from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convert import schema
from convert.cli import main
from convert.config import compose_config, group_choices
from tests.test_reliability import FAST

ROOT = Path(__file__).resolve().parent.parent


def _overrides_for_every_group():
    """One composed config per choice of every group (each may bring keys of its own)."""
    for group, choices in group_choices().items():
        for choice in choices:
            if group == "launcher" and choice != "basic":
                continue  # plugin launchers need their package; their keys are Hydra's, not ours
            yield [f"{group}={choice}"] + ([f"data.root={ROOT}"] if choice == "imagenet" else [])


@pytest.mark.parametrize("overrides", list(_overrides_for_every_group()), ids=lambda o: o[0])
def test_every_config_key_has_a_rule(overrides):
    cfg = compose_config(overrides)
    assert schema.missing_rules(cfg) == []
    schema.validate_config(cfg)  # the shipped configs are valid


CASES = [(key.path, value, why) for key in schema.keys() for value, why in schema.bad_values(key)] + [
    ("model.name", "vit_bsae", "unknown model"),
    ("neuron.levels", "40", "multi-threshold levels above 30", ["neuron=multi_threshold"]),
    ("neuron.levels", "2", "the ternary neuron has one level", ["neuron=ternary"]),
    ("attention.mask_p", "0.3", "mask_p without psa"),
    ("neuron.levels", "2", "ssa needs binary neurons", ["attention=ssa"]),
    ("attention.residual", "spike_driven", "spike-driven needs binary neurons", ["neuron.levels=4"]),
    ("finetune.weights", "false", "nothing to train", ["finetune=bptt", "finetune.thresholds=false"]),
    ("data.name", "imagenet", "imagenet without a root"),
]


def test_at_least_60_generated_cases_cover_every_key():
    covered = {case[0] for case in CASES}
    assert len(CASES) >= 60 and covered == {k.path for k in schema.keys()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}={c[1]}")
def test_bad_value_gets_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    path, value, why, *extra = case
    out = tmp_path / "run"
    if path == "out":
        args = [*FAST, f"out={value}"]
    else:
        args = [*FAST, *(extra[0] if extra else []), f"{path}={value}", "--out", str(out)]
    start = time.time()
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    elapsed = time.time() - start
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert rc == 2, (why, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, (why, err)
    assert not out.exists() or not any(out.iterdir()), why
    assert elapsed < 5, (why, elapsed)


NAN, INF = float("nan"), float("inf")
# convert() options, the same values as CLI overrides, and the one message both must give
API_CASES = [
    (dict(levels=0), ["neuron.levels=0"], "neuron.levels must be an integer in 1..1024, got 0"),
    (dict(v_init=NAN), ["neuron.v_init=nan"], "neuron.v_init must be a finite number in [0, 1], got nan"),
    (dict(percentile=INF), ["calibration.percentile=inf"],
     "calibration.percentile must be a finite number in (0, 100], got inf"),
    (dict(num_images=-5), ["calibration.num_images=-5"], "calibration.num_images must be an integer >= 1, got -5"),
    (dict(neuron="lif"), ["neuron.name=lif"], "unknown neuron.name 'lif': use one of signed_if, if, multi_threshold, "
                                              "ternary"),
    (dict(attention="psa", mask_p=1.0), ["attention=psa", "attention.mask_p=1.0"],
     "attention.mask_p must be a finite number in [0, 1), got 1.0"),
    (dict(step_mode="x"), ["step_mode=x"], "unknown step_mode 'x': use one of s, m"),
    (dict(mask_p=0.3), ["attention.mask_p=0.3"], "attention.mask_p=0.3 applies to attention=psa only "
                                                 "(attention is 'ecm')"),
    (dict(levels=40, neuron="multi_threshold"), ["neuron=multi_threshold", "neuron.levels=40"],
     "neuron.levels must be in 1..30 for neuron=multi_threshold (levels 2^0 .. 2^(N-1)), got 40"),
]


@pytest.mark.parametrize("options, overrides, message", API_CASES, ids=lambda c: str(c)[:40])
def test_the_python_api_answers_with_the_cli_messages(options, overrides, message, capsys):
    from convert import convert
    from tests.conftest import build
    with pytest.raises(ValueError) as info:
        convert(build("cls_token"), torch.randn(2, 3, 16, 16), timesteps=2, progress=False, **options)
    assert str(info.value) == message
    assert main([*FAST, *overrides]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("call, message", [
    (lambda snn: __import__("convert").finetune(snn, torch.randn(4, 3, 16, 16), epochs=1, lr=-1, distill=1),
     r"finetune.lr must be a finite number in \(0, 10\] or null, got -1"),
    (lambda snn: __import__("convert").finetune(snn, torch.randn(4, 3, 16, 16), epochs=-1, distill=1),
     "finetune.epochs must be an integer in 0..100000, got -1"),
    (lambda snn: __import__("convert").finetune(snn, torch.randn(4, 3, 16, 16), epochs=1, distill=2.0),
     r"finetune.distill must be a finite number in \[0, 1\], got 2.0"),
    (lambda snn: __import__("convert").finetune(snn, torch.randn(4, 3, 16, 16), epochs=1, distill=1,
                                               warmup=float("nan")), "finetune.warmup must be a finite number"),
])
def test_finetune_answers_with_the_schema_messages(call, message):
    from convert import convert
    from tests.conftest import build
    snn = convert(build("cls_token"), torch.randn(4, 3, 16, 16), timesteps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        call(snn)


def test_reliability_lists_every_keys_rule():
    assert schema.markdown() in (ROOT / "RELIABILITY.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["data.batch_size=0"], "data.batch_size must be an integer in 1..1048576, got 0"),
    (["neuron.v_init=nan"], "neuron.v_init must be a finite number in [0, 1], got nan"),
    (["neuron.levels=1000000"], "neuron.levels must be an integer in 1..1024, got 1000000"),
    (["data.eval_images=-5"], "data.eval_images must be an integer >= 1 or null, got -5"),
    (["--out", "/proc/forbidden"], "/proc/forbidden"),
    (["--timesteps", "65536", "step_mode=m", "data.batch_size=65536"], "lower data.batch_size"),
])
def test_the_reported_commands_are_answered_up_front(args, message, capsys):
    """The commands of the issue that filed the schema (and a run too large for memory): one line, exit 2,
    before any conversion."""
    start = time.time()
    rc = main([*FAST, *args] if "--out" in args else [*FAST, *args, "--out", "/nonexistent-parent/run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert time.time() - start < 5


def test_memory_estimate_names_the_need_and_the_limit(monkeypatch):
    from convert import resources
    from tests.conftest import build
    ann = build("cls_token")
    inputs = {"channels": 3, "size": (16, 16)}
    need = resources.check_memory(ann, inputs, torch.device("cpu"), "simulating the SNN", 8, 4, "s")
    assert need > 0
    # multi-step memory grows with T, step mode's does not
    assert resources.estimate_bytes(resources.activation_elements(ann, inputs), 8, 64, "m") > 8 * need
    assert resources.check_memory(ann, inputs, torch.device("cpu"), "x", 8, 64, "s") == need
    # chunks of c steps: a call's activations as multi-step at T=c, plus the state they carry (step mode's)
    elements = resources.activation_elements(ann, inputs)
    chunked = resources.estimate_bytes(elements, 8, 64, "m", chunk=4)
    assert chunked == resources.estimate_bytes(elements, 8, 4, "m") + resources.estimate_bytes(elements, 8, 1, "s") \
        - resources.BYTES * 8 * 4 * elements[1]
    assert resources.estimate_bytes(elements, 8, 4, "m", chunk=8) == resources.estimate_bytes(elements, 8, 4, "m")
    # the probe runs where the weights are (a GPU's; here the meta device stands in for one)
    assert resources.activation_elements(copy.deepcopy(ann).to("meta"), inputs) == elements
    monkeypatch.setattr(resources, "available_bytes", lambda device: need)  # less than need / SAFETY
    with pytest.raises(ValueError, match=r"simulating the SNN needs about .* GiB .* available on cpu: lower "
                                         r"data.batch_size"):
        resources.check_memory(ann, inputs, torch.device("cpu"), "simulating the SNN", 8, 4, "s")


FREED_MEMORY = (  # inside the block: 256 MB freed (a small tensor allocated after it stays), then 128 MB
    "import ctypes, resource, torch; from convert import resources;"
    "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt;"
    "glibc = hasattr(ctypes.CDLL(None), 'gnu_get_libc_version');"
    "rss = lambda: int(open('/proc/self/statm').read().split()[1]) if glibc else 0\n"
    "with resources.freed_memory_reused(torch.device('cpu')):\n"
    "    a = torch.ones(2 ** 26); small = torch.ones(16); del a; before = faults(); b = torch.ones(2 ** 25)\n"
    "    faulted = faults() - before; del b; inside = rss()\n"
    "print(resources.keep_freed_memory(), faulted, inside - rss(), glibc)")


@pytest.mark.parametrize("env", [{}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_freed_host_memory_is_reused_unless_the_user_set_malloc(env):
    """freed_memory_reused: a 128 MB tensor allocated after a 256 MB one was freed reuses its pages (glibc), so
    the kernel need not fault them in again, and the free pages go back to the system at the block's end; a
    user's own malloc setting is left alone (the allocation faults as before: glibc maps a block that large on
    its own and unmaps it at free)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    res = subprocess.run([sys.executable, "-c", FREED_MEMORY], capture_output=True, text=True,
                         env={**base, **env}, cwd=ROOT)
    kept, faults, released, glibc = res.stdout.split()
    pages = 2 ** 27 // resource.getpagesize()
    assert kept == str(glibc == "True" and not env), res.stderr[-2000:]
    if kept == "True":
        assert int(faults) < pages // 100
        assert int(released) > pages  # the 256 MB kept inside the block, given back at its end
    elif glibc == "True":
        assert int(faults) > pages // 2


def test_cpu_simulation_and_finetuning_keep_freed_memory(monkeypatch):
    """Simulating on the CPU, and fine-tuning there, decide keep_freed_memory (through glibc's library)."""
    from convert import convert, finetune, resources
    from tests.conftest import build
    calls = []
    monkeypatch.setattr(resources, "_host_heap", {"decided": False, "libc": None})
    cdll = resources.ctypes.CDLL
    monkeypatch.setattr(resources.ctypes, "CDLL", lambda name: calls.append(name) or cdll(name))
    for k in list(os.environ):
        if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"):
            monkeypatch.delenv(k)
    ann = build("cls_token")
    snn = convert(ann, torch.randn(4, 3, 16, 16), timesteps=2, progress=False)
    calls.clear()
    snn.simulate(torch.randn(2, 3, 16, 16))
    assert calls and resources._host_heap["decided"]
    monkeypatch.setattr(resources, "_host_heap", {"decided": False, "libc": None})
    finetune(snn, (torch.randn(4, 3, 16, 16), torch.randint(0, ann.num_classes, (4,))), batch_size=4, lr=1e-4,
             progress=False)
    assert resources._host_heap["decided"]


@pytest.mark.parametrize("call, message", [
    (lambda snn, x: __import__("convert").energy_report(snn, x, timesteps=0), "timesteps"),
    (lambda snn, x: __import__("convert").energy_report(snn, torch.randn(2, 3, 8, 8)), "pixels"),
    (lambda snn, x: snn.simulate(x, timesteps=-1), "timesteps"),
])
def test_energy_report_and_simulate_answer_bad_values(call, message):
    from convert import convert
    from tests.conftest import build
    x = torch.randn(2, 3, 16, 16)
    snn = convert(build("cls_token"), x, timesteps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        call(snn, x)
