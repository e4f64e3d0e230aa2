"""The `cbcore` command (also `python -m cbcore`): run, status, report.

cbcore run toy_lq cifar10 --seeds 42 123 456 --gpus 0,1,2 --profile quick
cbcore status
cbcore report
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

import yaml

from cbcore import report, runner
from cbcore.params import ParamsError


def _gpus(text: str) -> list[str]:
    ids = [g.strip() for g in text.split(",")]
    if not all(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU ids like 0,1,2")
    return ids


def _key_value(text: str) -> tuple[str, object]:
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(raw)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cbcore", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="execute experiment notebooks, one papermill run per seed")
    r.add_argument("experiments", nargs="+", metavar="EXPERIMENT", help="toy_lq, cifar10")
    r.add_argument(
        "--seeds", nargs="+", type=int, default=[42], help="one run per seed (default 42)"
    )
    r.add_argument(
        "--gpus",
        type=_gpus,
        default=None,
        help="GPU ids, one run per GPU at a time (default: CPU only)",
    )
    r.add_argument(
        "--profile", default="paper", help="params/profiles/<profile>.yaml (default paper)"
    )
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter (repeatable), e.g. --set sigma_bridge=0.1",
    )
    r.add_argument("--force", action="store_true", help="re-run finished runs from scratch")
    r.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel runs (default: one per GPU, or 1 on the CPU)",
    )
    r.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="local processes, or SLURM jobs through submitit",
    )
    r.add_argument(
        "--slurm",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameter (repeatable), e.g. --slurm slurm_partition=gpu",
    )
    r.add_argument(
        "--timeout",
        type=float,
        default=runner.DEFAULT_TIMEOUT_S,
        help=f"wall-clock limit per run in seconds (default {runner.DEFAULT_TIMEOUT_S:g})",
    )
    r.add_argument("--root", default="executed", help="where run directories go (default executed)")
    r.add_argument(
        "--notebooks", default=None, help="notebooks dir (default: the repo's notebooks/)"
    )

    for name, text in (
        ("status", "print the table of runs"),
        ("report", "render executed notebooks to HTML and write index.html"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--root", default="executed", help="executed runs (default executed)")
    return ap


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so `kill` also stops the runs this process started


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "run":
            return runner.run(
                args.experiments,
                args.seeds,
                profile=args.profile,
                sets=args.sets,
                gpus=args.gpus,
                jobs=args.jobs,
                force=args.force,
                executor=args.executor,
                timeout=args.timeout,
                root=args.root,
                notebooks_dir=args.notebooks,
                slurm=dict(args.slurm),
            )
        if args.command == "status":
            return report.print_status(args.root)
        return report.build_report(args.root)
    except (ParamsError, runner.RunnerError, report.ReportError) as e:
        print(f"cbcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"cbcore {args.command}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
