"""What the train loop does about faults: loss spikes (roll back to the newest checkpoint),
preemption (SIGTERM -> a final checkpoint) and closing writers on the error path."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import numpy as np

from zhchat.trainer.checkpoints import CheckpointWriteError
from zhchat.trainer.metrics import MetricsWriteError

# What a run cannot continue without: its checkpoints and its metrics record. The CLIs end the
# process on these (`exit_after_write_error`).
WRITE_ERRORS = (CheckpointWriteError, MetricsWriteError)


class SkipCounter:
    """Counts the steps skipped for a non-finite loss or gradient; past `max_skipped` the run
    has diverged and stops (FloatingPointError naming the last checkpoint)."""

    def __init__(self, max_skipped: int | None):
        self.max_skipped, self.total = max_skipped, 0

    def add(self, skipped: int, step: int, last_checkpoint: int | None) -> None:
        if not skipped:
            return
        self.total += skipped
        print(f"warning: {skipped} step(s) up to step {step} had a non-finite loss or gradient "
              f"and were skipped ({self.total} in all)", file=sys.stderr, flush=True)
        if self.max_skipped is not None and self.total >= self.max_skipped:
            raise FloatingPointError(
                f"training diverged: {self.total} steps up to step {step} had a non-finite loss "
                f"or gradient (max_skipped_steps={self.max_skipped}); the last checkpoint is "
                f"step {last_checkpoint}: lower the learning rate or restart from it")


class SpikeGuard:
    """Loss-spike detection on the logged losses (a running median of the last 20 windows)."""

    def __init__(self, factor: float | None, max_rollbacks: int):
        self.factor, self.max_rollbacks = factor, max_rollbacks
        self.recent: list[float] = []
        self.rollbacks = 0

    def is_spike(self, loss: float | None) -> bool:
        if self.factor is None or loss is None:
            return False
        median = float(np.median(self.recent)) if len(self.recent) >= 10 else None
        spike = median is not None and (not np.isfinite(loss) or loss > self.factor * median)
        if not spike:
            self.recent = (self.recent + [loss])[-20:]
        self.median = median
        return spike

    def roll_back(self, state: Any, checkpointer: Any, step: int, loss: float, abstract: Any
                  ) -> Any:
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise FloatingPointError(
                f"training diverged: loss spike at step {step} ({loss:.4g} > {self.factor:g} x "
                f"median {self.median:.4g}) after {self.max_rollbacks} rollbacks")
        checkpointer.wait()
        restored, _, from_step = checkpointer.restore(abstract)
        print(f"warning: loss spike at step {step} ({loss:.4g} > {self.factor:g} x median "
              f"{self.median:.4g}): rolled back to the params of step {from_step}, skipping the "
              f"batches of steps {from_step + 1}-{step} (rollback {self.rollbacks} of "
              f"{self.max_rollbacks})", file=sys.stderr, flush=True)
        return restored.replace(step=state.step)


@contextlib.contextmanager
def guarded_run(writer: Any, checkpointer: Any) -> Iterator["Preemption"]:
    """The body of a train loop: SIGTERM is watched (`Preemption.requested`) while it runs, and
    an error or Ctrl-C releases the metrics and checkpoint writer threads before it propagates
    (so the process cannot hang at exit); the previous SIGTERM handler is put back after."""
    preempted = Preemption()
    try:
        yield preempted
    except BaseException:
        close_quietly(writer, checkpointer)
        raise
    finally:
        preempted.restore()


def close_quietly(writer: Any, checkpointer: Any) -> None:
    """Releases the writer threads after an error without hiding that error."""
    manager = getattr(checkpointer, "manager", None)
    for close in (writer.close, manager.close if manager is not None else None):
        if close:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass


def exit_after_write_error() -> None:
    """Prints the write error being handled (`WRITE_ERRORS`) and ends the process at once (exit 1).

    When a save fails before its folder exists (a read-only or lost mount), orbax's background
    signalling threads wait forever for that save, and a normal interpreter exit joins them: the
    run would print its error and then hang. A full disk can fail the metrics first while such a
    save is in flight, hence the same exit for both."""
    import os
    import traceback

    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class Preemption:
    """SIGTERM (what TPU, Kubernetes and SLURM send before preempting) sets `requested`; the loop
    then stops after the current step and the final synchronous checkpoint is written."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
