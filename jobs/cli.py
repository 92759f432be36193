"""The `unclip` command: one subcommand per stage, each mapping flags onto that stage's config dataclass."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from jobs.config import add_dataclass_args, build_config, explicit_bools
from pipeline.errors import Interrupted, StageError, Stopped, UsageError


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # module holding the config class and `run`
    config: str  # config class name
    positional: tuple[str, ...] = ()
    report: str | None = None  # optional printer "module:function" for the returned report
    # What Ctrl-C's message tells the user: these stages pick up where they stopped on a rerun; the trainers
    # continue with --resume (the same command without it is refused: --out holds a run); the rest start over.
    on_interrupt: str = "rerun the same command to continue"


RESUME = "rerun it with --resume to continue from the last checkpoint"
AGAIN = "rerun the same command to start again"

COMMANDS: dict[str, Command] = {
    "demo-data": Command("draw the built-in procedural demo dataset", "pipeline.demo_data", "DemoDataConfig"),
    "download": Command(
        "download a URL/caption table into webdataset shards (img2dataset)",
        "pipeline.download",
        "DownloadConfig",
        report="jobs.demo:print_download_summary",
    ),
    "embed": Command(
        "embed webdataset shards with CLIP (and latents) into the shard-aligned store",
        "pipeline.embed",
        "EmbedConfig",
        report="pipeline.embed:print_report",
    ),
    "validate": Command(
        "check every shard of an embedding store against its manifest",
        "pipeline.validate",
        "ValidateConfig",
        on_interrupt=AGAIN,
        positional=("store",),
        report="pipeline.validate:print_report",
    ),
    "adopt": Command(
        "make a clip-retrieval / LAION embedding folder a store (writes only manifest.json and done/)",
        "pipeline.adopt",
        "AdoptConfig",
        positional=("folder",),
    ),
    "train-prior": Command(
        "train the diffusion prior on an embedding store",
        "jobs.train_prior",
        "TrainPriorConfig",
        on_interrupt=RESUME,
    ),
    "eval-prior": Command(
        "evaluate a prior checkpoint on a store's held-out split",
        "jobs.eval_prior",
        "EvalPriorConfig",
        on_interrupt=AGAIN,
    ),
    "train-decoder": Command(
        "train the image decoder (CLIP image embedding -> latents) on a store with latents",
        "jobs.train_decoder",
        "TrainDecoderConfig",
        on_interrupt=RESUME,
    ),
    "sample": Command(
        "text -> image: CLIP text tower, prior, decoder -> a PNG grid",
        "jobs.sample",
        "SampleConfig",
        on_interrupt=AGAIN,
        report="jobs.sample:print_report",
    ),
    "eval-decoder": Command(
        "evaluate a decoder (and text -> image with --prior) on a store's held-out split",
        "jobs.eval_decoder",
        "EvalDecoderConfig",
        on_interrupt=AGAIN,
        report="jobs.eval_decoder:print_report",
    ),
    "export": Command(
        "write a trained prior and decoder as diffusers pipeline folders (Kandinsky 2.2 form)",
        "jobs.export",
        "ExportConfig",
        on_interrupt=AGAIN,
    ),
    "bench": Command(
        "measure every stage against its physical limit (writes bench/results.json)",
        "jobs.bench.main",
        "BenchConfig",
        on_interrupt=AGAIN,
    ),
    "bench-anchors": Command(
        "our stages against clip-retrieval, embedding-reader and dalle2-pytorch (writes bench/anchors.json)",
        "jobs.bench.anchors",
        "AnchorsConfig",
        on_interrupt=AGAIN,
        report="jobs.bench.anchors:print_report",
    ),
    "device-check": Command(
        "on a GPU: every CUDA path in one short run (writes device_out/device_check.json)",
        "jobs.bench.device_check",
        "DeviceCheckConfig",
        on_interrupt=AGAIN,
    ),
    "demo": Command("run every stage on the built-in demo dataset", "jobs.demo", "DemoConfig"),
}


def _resolve(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class _Parser(argparse.ArgumentParser):
    """argparse's refusals (a flag's type or choices, a missing flag) as one line, like every other error;
    the usage block it prints before them is one `--help` away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and getattr(self, "bool_flags", None):  # a subcommand's own arguments
            args = explicit_bools(self.bool_flags, list(args), getattr(self, "flags", set()) | {"--config"})
        return super().parse_known_args(args, namespace)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only the one named in ``argv`` imports its module (and so torch), which
    keeps `unclip download` as quick to start as img2dataset itself."""
    parser = _Parser(prog="unclip", description="unCLIP data pipeline and trainers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in COMMANDS), None)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == chosen:
            add_dataclass_args(p, getattr(importlib.import_module(cmd.module), cmd.config), cmd.positional)
    return parser


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs through the root logger: seven INFO lines a model it builds, and a warning for random
    weights that `pipeline.encoders` gives in its own words. Kept with --verbose; its other warnings always."""
    if f"{os.sep}open_clip{os.sep}" not in record.pathname:
        return True
    return record.levelno >= logging.WARNING and not record.getMessage().startswith(
        "No pretrained weights loaded"
    )


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C while torch and the command's module import (seconds): one line, not a traceback
        return _main(argv)
    except KeyboardInterrupt:
        print("unclip: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("distributed", "urllib3", "PIL"):  # dask logs every worker start and stop at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_open_clip)
    cmd = COMMANDS[args.command]
    module = importlib.import_module(cmd.module)
    try:
        cfg = build_config(getattr(module, cmd.config), args)
        report = module.run(cfg)
    except UsageError as e:
        print(f"unclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"unclip {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        kept = f"{e}; " if isinstance(e, Interrupted) else ""  # what the stage kept, where it said
        hint = AGAIN if getattr(e, "nothing_kept", False) and cmd.on_interrupt == RESUME else cmd.on_interrupt
        print(f"unclip {args.command}: interrupted; {kept}{hint}", file=sys.stderr)
        return 130
    except Stopped as e:
        how = (
            "interrupted (Ctrl-C)"
            if e.signum == signal.SIGINT
            else f"stopped by {signal.Signals(e.signum).name}"
        )
        print(f"unclip {args.command}: {how}: {e}; {cmd.on_interrupt}", file=sys.stderr)
        return 128 + e.signum
    except OSError as e:  # the system refused a read or a write (a full disk, a path it will not take)
        logging.getLogger(__name__).debug("where", exc_info=True)
        hint = "" if args.verbose else " (--verbose shows where)"
        print(f"unclip {args.command}: failed: {e}{hint}", file=sys.stderr)
        return 1
    # under torchrun, rank 0 alone reports a training run
    quiet = args.command.startswith("train-") and os.environ.get("RANK", "0") != "0"
    if cmd.report and not quiet:
        _resolve(cmd.report)(report)
    elif report is not None and not cmd.report and not quiet and args.command != "demo":
        print(json.dumps(report, indent=2, default=str))
    return int(report.get("exit_code", 0)) if isinstance(report, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
