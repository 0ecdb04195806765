"""kill -9 in the middle of a trainer CLI run, then the same command again: the resumed run's
per-step losses equal an uninterrupted run's bit for bit, and metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _command(run_dir):
    return [sys.executable, "-m", "zhchat.trainer.train", "--gin_file=models/decoder_tiny.gin",
            "--gin_file=runs/pretrain.gin", "--gin_file=runs/synthetic_data.gin",
            f"--gin.RUN_DIR='{run_dir}'", "--gin.VOCAB_SIZE=256", "--gin.SEQ_LEN=16",
            "--gin.BATCH_SIZE=8", "--gin.NUM_STEPS=40", "--gin.train.log_every=1",
            "--gin.train.checkpoint_every=5", "--gin.train.progress_bar=False",
            "--gin.make_schedule.warmup_steps=5"]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _lines(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_kill_9_then_restart_continues_bit_identically(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_command(straight), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _lines(killed) < 17 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = _losses(killed)
    assert 17 <= len(done) < 40
    restart = subprocess.run(_command(killed), check=True, capture_output=True, text=True,
                             timeout=600)
    assert "restored step" in restart.stderr
    want, got = _losses(straight), _losses(killed)
    assert [s for s, _ in got] == list(range(1, 41))  # each step once
    assert got == want  # bit-identical losses, before and after the kill
