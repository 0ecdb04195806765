"""A real write limit, no patched writer: the trainer CLI under RLIMIT_FSIZE (every file write past
200 kB fails with EFBIG, as on a full disk) stops at the first step after its asynchronous
checkpoint save fails, non-zero and naming the checkpoint and the OS error; it never hangs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from test_kill_resume import _command


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_file_size_limit_stops_the_run_loudly(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(_command(run_dir), preexec_fn=_limit_file_size, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    last = [ln for ln in proc.stderr.splitlines() if "CheckpointWriteError" in ln][-1]
    assert "asynchronous save of checkpoint step 5" in last and "File too large" in last
    assert not os.path.isdir(run_dir / "checkpoints" / "5")  # never committed
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) < 40  # stopped, not run to the end with the failure ignored
