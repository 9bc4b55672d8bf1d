"""``python -m convert MODEL --timesteps T [--checkpoint FILE] [--data ROOT] [--out DIR] [key=value ...]``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import List, Optional

from omegaconf import OmegaConf

from convert.config import GROUPS, compose_config, group_choices
from convert.multirun import check_launcher
from models.distributed import rank, shutdown, world_size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end with one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m convert --help)\n")


def build_parser() -> argparse.ArgumentParser:
    choices = group_choices()
    epilog = "config groups (override with group=choice, or any key=value, e.g. neuron.levels=4):\n" + "\n".join(
        f"  {g:<12} {', '.join(choices[g])}" for g in GROUPS)
    parser = OneLineParser(
        prog="python -m convert", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Convert a timm Vision Transformer into a spiking network; report its accuracy at every timestep.")
    parser.add_argument("model", nargs="?", default="vit_fmnist",
                        help="vit_fmnist (embedded default), an alias (vit_base, deit_small, ...) or any timm name")
    parser.add_argument("--timesteps", "-T", type=_positive_int, default=None, help="number of timesteps T (default 16)")
    parser.add_argument("--checkpoint", help="ANN weights: .safetensors or a torch state dict")
    parser.add_argument("--data", help="data root (sets data.root)")
    parser.add_argument("--out", help="output folder (default runs/<date>_<time>_<model>)")
    parser.add_argument("--load", help="re-evaluate a saved SNN checkpoint (snn.safetensors) instead of converting")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    parser.add_argument("--list-models", nargs="?", const="*", metavar="PATTERN",
                        help="list the models that convert (pretrained timm names matching PATTERN, e.g. 'eva*', "
                             "from the table benchmarks.coverage records) and exit")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="Hydra multirun: one job per combination of comma-separated override values "
                             "(e.g. -m attention=ecm,psa neuron.levels=1,2); launcher=basic|submitit_local|submitit_slurm")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: group=choice or key=value")
    return parser


def build_overrides(args: argparse.Namespace) -> List[str]:
    overrides = []
    given = {o.split("=", 1)[0].lstrip("+~") for o in args.overrides}
    if args.model != "vit_fmnist":
        from models.zoo import FMNIST_MODELS
        overrides += ["model=timm", f"model.name={args.model}"]
        if "data" not in given and args.model not in FMNIST_MODELS:  # the reference models keep Fashion-MNIST
            overrides.append("data=imagenet")
    if args.timesteps is not None:
        overrides.append(f"timesteps={args.timesteps}")
    if args.checkpoint:
        overrides.append(f"model.checkpoint={args.checkpoint}")
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    return overrides + list(args.overrides)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if "=" in args.model:  # an override in the model's place: the default model
        args.overrides.insert(0, args.model)
        args.model = "vit_fmnist"
    if args.list_models is not None:
        from models.zoo import convertible_models
        rows, footer = convertible_models(args.list_models)
        width = max((len(n) for n, _ in rows), default=0)
        try:
            for name, status in rows:
                print(f"{name:{width}s}  {status}")
            print(footer, flush=True)
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")
        return 0
    if args.load and args.checkpoint:
        parser.error("--load (a saved SNN) and --checkpoint (ANN weights to convert) exclude each other")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.multirun:
            if args.load or args.cfg:
                parser.error("--multirun sweeps conversions: it does not combine with --load or --cfg")
            from convert.multirun import multirun
            multirun(build_overrides(args), out=args.out)
            return 0
        check_launcher(args.overrides)
        cfg = compose_config(build_overrides(args))
        if args.cfg:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from convert.run import run
        run(cfg, load_path=args.load)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError) as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a vanished mount: earlier outputs stay as they were
        print(f"{_rank_prefix()}error: {exc.strerror or exc} ({exc.filename or 'while reading or writing'}): "
              f"nothing was half-written; free space or choose another --out", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{_rank_prefix()}interrupted: {exc.args[0] if exc.args else 'the run folder was not written'}",
              file=sys.stderr)
        return 130
    finally:
        shutdown()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    """SIGTERM (a cluster's time limit, kill) ends the run like Ctrl-C: cleanly, nothing half-written."""
    raise KeyboardInterrupt()


def _rank_prefix() -> str:
    return f"rank {rank()}: " if world_size() > 1 else ""
