"""The trainer's command line: `python -m zhchat.trainer.train --gin_file=... --gin.X=...`.

Parses gin (unknown or misspelt macros are errors before anything runs), joins a multi-host job
when a coordinator is given (flags or JAX_* variables: scripts/launch/), then runs `train`.
"""

from __future__ import annotations

import argparse
import os
import sys

import gin
import jax

from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import faults
from zhchat.trainer import train as train_lib


def _distributed_init(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID when a coordinator is given (multi-host launch), or with no arguments under
    `--distributed=auto` (JAX detects the TPU pod or cluster)."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        if args.distributed == "auto":  # TPU pods, SLURM, ...: JAX finds the cluster itself
            jax.distributed.initialize()
        return
    num = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=None if num is None else int(num),
                               process_id=None if pid is None else int(pid))


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse gin, optionally join a multi-host job, run `train` (or the dry run)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        files, bindings, rest = gin_cli.split_gin_args(argv)
        parser = argparse.ArgumentParser(prog="python -m zhchat.trainer.train")
        parser.add_argument("--dry_run", action="store_true",
                            help="print params/mesh/shardings/FLOPs via eval_shape and exit")
        parser.add_argument("--coordinator_address", default=None)
        parser.add_argument("--num_processes", type=int, default=None)
        parser.add_argument("--process_id", type=int, default=None)
        parser.add_argument("--distributed", choices=("off", "auto"), default="off",
                            help="auto: jax.distributed.initialize() with no arguments (the "
                            "cluster detected by JAX, e.g. every host of a TPU pod)")
        args = parser.parse_args(rest)
        gin_cli.parse_gin(files, bindings)
        gin_cli.check_unbound_macros()
    except gin_cli.GinConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    _distributed_init(args)
    if args.dry_run:  # data is never read: do not build (or need the packages of) its readers
        gin.bind_parameter("train.train_data", None)
        gin.bind_parameter("train.eval_data", None)
    try:
        summary = train_lib.train(dry_run=args.dry_run)
    except faults.WRITE_ERRORS:
        faults.exit_after_write_error()
    except FileNotFoundError as e:  # a cache, vocabulary or checkpoint that is not there
        print(f"train: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:  # gin: a REQUIRED binding (e.g. the model) missing,
        first = str(e).splitlines()[0] if str(e) else ""  # or a skipped configurable is used
        if not first.startswith(("Required bindings", "No configurable matching")):
            raise
        absent = "; ".join(f"{m} needs {d}, not installed"
                           for m, d in gin_cli.unavailable().items())
        print(f"gin config error: {first}" + (f" [not importable here: {absent}]" if absent
                                              else ""), file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"finished at step {summary['step']}, loss {summary['loss']:.4f}", flush=True)
    return 0


def console_main() -> None:
    sys.exit(main())

