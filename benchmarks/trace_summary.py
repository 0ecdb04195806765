"""Where the device time of a profiled step goes: kernel time by kind from a JAX perfetto trace.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes `perfetto_trace.json.gz`; this reads the
kernels on the GPU stream tracks (the derived "XLA Ops"/"XLA Modules" tracks would count them twice)
and sums their durations into matmul / attention / collective / copy / other-fusion kinds, plus the
busiest kernel names and the share of the traced span the GPU was idle.

    python -m zhchat.benchmarks.trace_summary PROFILE_DIR_OR_TRACE_FILE [--steps=N]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
from typing import Any

# kernel-name fragments per kind, tried in this order (lower-case)
KINDS = (
    ("attention", ("fmha", "sdpa", "flash", "cudnn", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
    ("collective", ("nccl", "all_reduce", "all-reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel from its name; anything unmatched is an XLA fusion ("other")."""
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def find_trace(profile_dir: str) -> str:
    """`profile_dir` itself if it is a trace file, else the newest *perfetto_trace.json.gz in it."""
    if os.path.isfile(profile_dir):
        return profile_dir
    paths = glob.glob(os.path.join(profile_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {profile_dir}: profile with "
                                f"jax.profiler.trace(dir, create_perfetto_trace=True)")
    return max(paths, key=os.path.getmtime)


def summarize(events: list[dict[str, Any]], *, steps: int = 1, top: int = 15) -> dict[str, Any]:
    """Kernel time per kind (ms per step and share of kernel time) on device stream tracks."""
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if "/device:" in name}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
               and threads.get((e["pid"], e.get("tid")), "").lower().startswith("stream")]
    if not kernels:
        raise ValueError(f"no device stream kernels in the trace (processes: {sorted(procs.values())})")
    by_kind: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    for e in kernels:
        by_kind[kernel_kind(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
    total = sum(by_kind.values())
    start = min(e["ts"] for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - start
    busy = _union_length(sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels))
    ms = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    return {
        "steps": steps, "kernels": len(kernels), "span_ms_per_step": ms(span),
        "busy_ms_per_step": ms(busy), "idle_fraction": round(1 - busy / span, 4) if span else 0.0,
        "kinds_ms_per_step": {k: ms(v) for k, v in by_kind.most_common()},
        "kinds_share": {k: round(v / total, 4) for k, v in by_kind.most_common()},
        "top_kernels_ms_per_step": [[n[:120], ms(v)] for n, v in by_name.most_common(top)],
    }


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by sorted [start, end) intervals (overlapping streams count once)."""
    covered, cur_start, cur_end = 0.0, None, None
    for s, e in intervals:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                covered += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return covered + (0.0 if cur_end is None else cur_end - cur_start)


def summarize_dir(profile_dir: str, *, steps: int = 1) -> dict[str, Any]:
    with gzip.open(find_trace(profile_dir), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return summarize(events, steps=steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.trace_summary")
    p.add_argument("profile_dir")
    p.add_argument("--steps", type=int, default=1, help="profiled steps (times are per step)")
    args = p.parse_args(argv)
    print(json.dumps(summarize_dir(args.profile_dir, steps=args.steps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
