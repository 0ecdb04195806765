"""End-to-end training speed: the trainer CLI on a packed cache, as a user runs it.

Runs `python -m zhchat.trainer.train` in a subprocess with the given gin files and bindings (reader,
host-to-device transfer, eval and checkpoints included), then reads the run's metrics.jsonl and
reports the steady-state step time (median over logged windows after the first, which holds the
compile), the host seconds per step spent reading and placing batches (`host_data_s_per_step`:
hidden while below the device step, since reads overlap the dispatched step), MFU and the whole
wall time. Arguments other than --run_dir/--name/--out go to the trainer. Compare its step time with `train_throughput --data` on the same cache and shapes.

    python -m zhchat.benchmarks.train_cli --run_dir=/tmp/cli_run \
        --gin_file=gin_configs/models/decoder_100m.gin --gin_file=gin_configs/runs/pretrain.gin \
        --gin.TRAIN_CACHE_DIR="'CACHE'" --gin.BATCH_SIZE=32 --gin.NUM_STEPS=300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from zhchat.benchmarks import workloads


def summarize(metrics_path: str) -> dict[str, Any]:
    """Steady-state numbers from a run's metrics.jsonl (train rows after the first window)."""
    train_rows, eval_rows = [], []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if "train/step_time_s" in row:
                train_rows.append(row)
            elif any(k.startswith("eval/") for k in row):
                eval_rows.append(row)
    if len(train_rows) < 2:
        raise ValueError(f"{metrics_path}: {len(train_rows)} logged training windows with a step "
                         "time; run more steps (or log more often) to have a steady state")
    steady = train_rows[1:]
    med = lambda key: statistics.median(r[key] for r in steady if key in r)  # noqa: E731
    return {"windows": len(steady), "step_time_s": med("train/step_time_s"),
            "host_data_s_per_step": med("train/host_data_s_per_step"), "mfu": med("train/mfu"),
            "tokens_per_s_per_device": med("train/tokens_per_sec_per_device"),
            "final_loss": train_rows[-1].get("train/loss"), "eval_windows": len(eval_rows),
            "last_eval": eval_rows[-1] if eval_rows else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.train_cli", allow_abbrev=False)
    p.add_argument("--run_dir", required=True, help="emptied first; the run writes here")
    p.add_argument("--name", default="trainer_cli", help="the result's name")
    p.add_argument("--out", default=None, help="append the result as a json line to this file")
    args, trainer_args = p.parse_known_args(argv)
    if os.path.exists(args.run_dir):
        shutil.rmtree(args.run_dir)
    cmd = [sys.executable, "-m", "zhchat.trainer.train", *trainer_args,
           f"--gin.RUN_DIR='{args.run_dir}'"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n", file=sys.stderr)
        print(f"trainer exited {proc.returncode}", file=sys.stderr)
        return proc.returncode
    result = {"system": "zhchat", "run": args.name, "mode": "trainer_cli", "wall_s": wall,
              "trainer_args": trainer_args,
              **summarize(os.path.join(args.run_dir, "metrics.jsonl"))}
    workloads.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
