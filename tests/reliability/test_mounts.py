"""Real mounts, no patched writers: the trainer CLI runs in a private mount namespace where
- its checkpoint folder is remounted read-only once checkpoint 5 is committed (every later write
  fails with EROFS, as on a lost or remounted volume), or
- its whole run folder is a 2 MiB tmpfs (checkpoints, metrics and TensorBoard fill it: ENOSPC).
Each run must stop non-zero at the first step after the failed write reports (for a background
save at the latest at the next save, which waits for it), naming the checkpoint or metrics file
and the OS error, and never hang; after the read-only case a restart resumes from checkpoint 5."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from test_kill_resume import _command

# Runs the trainer in the background, remounts its checkpoint folder read-only once step 5 is
# committed (orbax renames a finished step's temporary folder to "5"), then waits for it.
_SCRIPT = r"""
set -u
ck="$1"; shift
mount --bind "$ck" "$ck" || exit 97
"$@" & pid=$!
while kill -0 "$pid" 2>/dev/null && [ ! -d "$ck/5" ]; do sleep 0.005; done
mount -o remount,ro,bind "$ck" || { kill "$pid"; exit 98; }
echo "REMOUNTED read-only" >&2
wait "$pid"
"""


# checkpoint_every of the command: a background save's failure stops the run at the first step
# after it reports (`Checkpointer.check` every step; a few steps on a loaded machine) and at the
# latest at the next save, which waits for the previous one.
EVERY = 5


def _mount_namespaces_work(tmp_path) -> str | None:
    """None when a private read-only bind mount can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "no unshare/mount binaries"
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount --bind {probe} {probe} && mount -o remount,ro,bind {probe} && "
                           f"! touch {probe}/x 2>/dev/null"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"no private read-only mounts: {proc.stderr[-200:]}"


def test_a_checkpoint_folder_turned_read_only_mid_run_stops_it_loudly(tmp_path):
    why = _mount_namespaces_work(tmp_path)
    if why:
        pytest.skip(why)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    command = [a.replace("NUM_STEPS=40", "NUM_STEPS=400") for a in _command(run_dir)]
    proc = subprocess.run(["unshare", "-m", "sh", "-c", _SCRIPT, "sh", str(ckpt_dir), *command],
                          capture_output=True, text=True, timeout=300)
    assert "REMOUNTED read-only" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode not in (0, 97, 98), proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "CheckpointWriteError" in ln]
    assert errors, proc.stderr[-3000:]
    assert "Read-only file system" in errors[-1], errors[-1]
    failed = int(errors[-1].split("checkpoint step ")[1].split()[0])
    assert failed > 5 and failed % 5 == 0
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) <= failed + EVERY  # stopped, not run on unsaved (see EVERY)
    kept = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert 5 in kept and failed not in kept

    more = max(kept) + 2
    resumed = subprocess.run([a.replace("NUM_STEPS=40", f"NUM_STEPS={more}")
                              for a in _command(run_dir)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"restored step {max(kept)} from" in resumed.stderr + resumed.stdout


# The run folder on a small tmpfs; what the run wrote is copied out before the mount goes away.
_FULL_DISK = r"""
run="$1"; keep="$2"; size="$3"; shift 3
mount -t tmpfs -o size="$size" tmpfs "$run" || exit 97
"$@"; rc=$?
df -k "$run" | tail -1 >&2
cp "$run/metrics.jsonl" "$keep/" 2>/dev/null
ls "$run/checkpoints" > "$keep/checkpoints.txt" 2>/dev/null
exit $rc
"""


# 2 MiB: checkpoints fill it (usually the first failure is a save, but on a loaded machine the
# metrics or TensorBoard events can meet the full disk first, while a save is in flight).
# 96 KiB and no checkpoint before step 10**6: the metrics and events fill it.
@pytest.mark.parametrize("size,checkpoint_every", [("2m", 5), ("96k", 10**6)],
                         ids=["checkpoints", "metrics"])
def test_a_full_disk_stops_the_run_loudly(tmp_path, size, checkpoint_every):
    why = _mount_namespaces_work(tmp_path)
    if why:
        pytest.skip(why)
    run_dir, keep = tmp_path / "run", tmp_path / "keep"
    run_dir.mkdir()
    keep.mkdir()
    command = [a.replace("NUM_STEPS=40", "NUM_STEPS=2000")
               .replace("checkpoint_every=5", f"checkpoint_every={checkpoint_every}")
               for a in _command(run_dir)]
    proc = subprocess.run(["unshare", "-m", "sh", "-c", _FULL_DISK, "sh", str(run_dir), str(keep),
                           size, *command], capture_output=True, text=True, timeout=300)
    assert proc.returncode not in (0, 97), proc.stderr[-3000:]
    # Whichever write meets the full disk first stops the run: a checkpoint, metrics.jsonl or
    # the TensorBoard events (all three share the 2 MiB).
    errors = [ln for ln in proc.stderr.splitlines()
              if "CheckpointWriteError" in ln or "MetricsWriteError" in ln]
    assert errors and "No space left on device" in errors[-1], proc.stderr[-3000:]
    steps = _logged_steps(keep / "metrics.jsonl")
    kept = [int(s) for s in (keep / "checkpoints.txt").read_text().split() if s.isdigit()]
    if checkpoint_every > 2000:
        assert "MetricsWriteError" in errors[-1] and not kept
    if "CheckpointWriteError" in errors[-1]:
        failed = int(errors[-1].split("checkpoint step ")[1].split()[0])
        assert failed <= max(steps) <= failed + EVERY  # see EVERY
        assert failed not in kept  # the failed step was never committed
    else:
        failed = int(errors[-1].split(" at step ")[1].split(":")[0])
        assert max(steps) <= failed  # nothing trained past the record that failed
        assert all(k <= failed for k in kept)


def _logged_steps(path) -> list[int]:
    """Steps of metrics.jsonl; the last line may have been cut by the full disk."""
    steps = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            assert i == len(lines) - 1, f"unreadable line {i + 1} of {len(lines)}: {line!r}"
    return steps
