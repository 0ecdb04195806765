"""Training metrics: TensorBoard + a jsonl file in the run dir, a tqdm bar, throughput and MFU.

Only process 0 writes. Device metrics are fetched once per `log_every` window (one host sync), so the
steps in between are dispatched without waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import tqdm

from zhchat.models import flops as flops_lib


def throughput(*, tokens: float, seconds: float, flops_per_token: float, num_devices: int,
               peak_flops_per_device: float = flops_lib.H100_BF16_PEAK_FLOPS
               ) -> dict[str, float]:
    """tokens/s, tokens/s/device, achieved TFLOP/s per device and MFU (achieved / peak)."""
    seconds = max(seconds, 1e-9)
    flops_per_device = tokens * flops_per_token / seconds / num_devices
    return {"tokens_per_sec": tokens / seconds,
            "tokens_per_sec_per_device": tokens / seconds / num_devices,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_lib.mfu(tokens * flops_per_token, seconds, num_devices=num_devices,
                                 peak_flops_per_device=peak_flops_per_device)}


def mean_metrics(window: list[Mapping[str, Any]]) -> dict[str, float]:
    """Fetches a window of per-step device metrics (one transfer) and averages them per key."""
    host = jax.device_get(window)
    keys = host[0].keys() if host else []
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in keys}


class LogWindow:
    """The steps since the last log line: their device metrics (fetched once, at `flush`), the
    wall time from the end of the first (compiling) step, less eval and checkpoint pauses, and
    the host seconds spent reading and placing batches."""

    def __init__(self, *, tokens_per_step: float, flops_per_token: float,
                 peak_flops_per_device: float, schedule: Callable | None = None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak, self.schedule = peak_flops_per_device, schedule
        self.metrics: list[Mapping[str, Any]] = []
        self.t_start: float | None = None
        self.timed_steps, self.host_s = 0, 0.0

    def add(self, step_metrics: Mapping[str, Any], state: Any, *, host_s: float) -> None:
        self.metrics.append(step_metrics)
        self.host_s += host_s
        if self.t_start is None:  # the first step compiles: time throughput from its end
            jax.block_until_ready(state.step)
            self.t_start, self.timed_steps = time.perf_counter(), 0
        else:
            self.timed_steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Eval and checkpoint time is not training throughput."""
        began = time.perf_counter()
        yield
        if self.t_start is not None:
            self.t_start += time.perf_counter() - began

    def flush(self, step: int) -> tuple[dict[str, float], int]:
        """(the window's mean metrics plus throughput, MFU, step time, host data time per step
        and learning rate; the number of steps in it), and starts a new window."""
        scalars, steps = mean_metrics(self.metrics), len(self.metrics)
        if self.timed_steps:
            seconds = time.perf_counter() - self.t_start
            scalars.update(throughput(
                tokens=self.timed_steps * self.tokens_per_step, seconds=seconds,
                flops_per_token=self.flops_per_token, num_devices=jax.device_count(),
                peak_flops_per_device=self.peak))
            scalars["step_time_s"] = seconds / self.timed_steps
        # hidden while below the device's step time: the read overlaps the dispatched step
        scalars["host_data_s_per_step"] = self.host_s / max(steps, 1)
        if self.schedule is not None:
            scalars["learning_rate"] = float(self.schedule(step))
        self.metrics, self.t_start, self.timed_steps, self.host_s = [], time.perf_counter(), 0, 0.0
        return scalars, steps


class MetricsWriteError(RuntimeError):
    """metrics.jsonl or the TensorBoard events could not be written."""


def _truncate_after(path: str, step: int) -> None:
    """Drops the records of `path` past `step` (a restart resumes from step's checkpoint and logs
    the later steps again); unreadable lines are kept as they are."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line).get("step", 0)) > step:
                continue
        except (ValueError, AttributeError, TypeError):
            pass
        kept.append(line)
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


class MetricsWriter:
    """Writes scalars to TensorBoard (tensorboardX) and `metrics.jsonl`; drives the progress bar."""

    def __init__(self, run_dir: str | None, *, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self.run_dir = run_dir
        self._tb = self._jsonl = None
        if self.enabled and run_dir:
            os.makedirs(run_dir, exist_ok=True)
            from zhchat.trainer import tensorboard  # imported lazily: host 0 only
            self._tb = tensorboard.EventWriter(os.path.join(run_dir, "tensorboard"))
            path = os.path.join(run_dir, "metrics.jsonl")
            _truncate_after(path, initial_step)  # a resumed run replays the steps after it
            self._jsonl = open(path, "a", encoding="utf-8")
        self._bar = (tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                               desc="train") if self.enabled and progress_bar else None)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        try:
            if self._jsonl is not None:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
        except OSError as e:  # e.g. ENOSPC: stop now rather than train without a record
            raise MetricsWriteError(f"cannot write {self.run_dir}/metrics.jsonl at step {step}: "
                                    f"{e}") from e
        try:
            if self._tb is not None:
                self._tb.scalars(step, {k: v for k, v in record.items() if k != "step"})
        except OSError as e:
            raise MetricsWriteError(f"cannot write the TensorBoard events of {self.run_dir} at "
                                    f"step {step}: {e}") from e
        if self._bar is not None and prefix == "train":
            shown = {k: scalars[k] for k in ("loss", "mfu") if k in scalars}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
