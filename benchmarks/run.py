"""The benchmark runner: runs named benchmarks (benchmarks/registry.py) and stamps their results.

    python -m zhchat.benchmarks.run NAME_OR_GROUP... [--out=results.jsonl] [--steps=N] [--repeat=N]
        [--data_root=DIR] [--cache=DIR] [--val_cache=DIR] [--work_dir=DIR] [--log_dir=DIR]
        [--profile_dir=DIR] [--in_process]
    python -m zhchat.benchmarks.run --list
    python -m zhchat.benchmarks.run headline --dry_run

Each benchmark runs in a fresh spawned Python process that calls its modules' entry points
(`main(argv)`): a process per benchmark because JAX preallocates most of a GPU's memory (an HF run
after it would not fit), XLA reads XLA_FLAGS once, and gin's state is global. The record appended
to --out (one json line per benchmark) carries the name, the git commit and whether the tree was
dirty (or $ZHCHAT_GIT_COMMIT / $ZHCHAT_GIT_DIRTY where the checkout has no .git), the UTC date,
device kind and count, package versions, the runner command and the entry-point commands that
reproduce it, the headline numbers (`metrics`) and the raw results (schema: docs/benchmarks.md).

Standard library only at import: --list and --dry_run work without jax, gin or TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Sequence

from zhchat.benchmarks import registry
from zhchat.benchmarks.registry import Benchmark, Call

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
METRIC_KEYS = ("step_time_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
               "peak_memory_gib", "compile_s", "warmup_and_compile_s", "host_data_s_per_step",
               "wall_s", "median_s", "tokens_per_s", "first_call_s", "seconds", "speedup")
STEPPED_KINDS = ("train_step", "hf_baseline")  # kinds whose --steps the runner's --steps sets
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


def placeholders(args: argparse.Namespace, name: str) -> dict[str, str]:
    """The values of the registry's `{...}` placeholders for benchmark `name`."""
    root = os.path.abspath(args.data_root)
    work_dir = os.path.abspath(args.work_dir)
    return {"repo": REPO, "work_dir": work_dir, "work": os.path.join(work_dir, name),
            "scratch": os.path.join(tempfile.gettempdir(), "zhchat_bench", name),
            "cache": os.path.abspath(args.cache or os.path.join(root, "bench", "zc100m_lm_train")),
            "val_cache": os.path.abspath(args.val_cache
                                         or os.path.join(root, "bench", "zc100m_lm_validation")),
            "conv": os.path.join(root, "conv"), "eval_data": os.path.join(root, "eval_data"),
            "pipeline": os.path.join(root, "zc100m"), "demo_data": os.path.join(root, "demo_data"),
            "tok": os.path.join(root, "tok"), "t5pack": os.path.join(root, "t5pack")}


def _fill(text: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"unknown placeholder {m.group(0)} in {text!r}")
        return values[m.group(1)]
    return re.sub(r"\{(\w+)\}", sub, text)


def render(bench: Benchmark, values: dict[str, str], *, steps: int | None = None,
           profile_dir: str | None = None) -> Benchmark:
    """The benchmark with placeholders filled, `--steps` replaced and (train steps) a profile
    folder added."""
    calls = []
    for call in bench.calls:
        args = [_fill(a, values) for a in call.args]
        if steps is not None and bench.kind in STEPPED_KINDS:
            args = [f"--steps={steps}" if a.startswith("--steps=") else a for a in args]
        if profile_dir and bench.kind == "train_step":
            args.append(f"--profile_dir={os.path.join(os.path.abspath(profile_dir), bench.name)}")
        calls.append(dataclasses.replace(call, args=tuple(args)))
    return dataclasses.replace(
        bench, calls=tuple(calls), results=tuple(_fill(r, values) for r in bench.results),
        env=tuple((k, _fill(v, values)) for k, v in bench.env))


def _quote(arg: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./\-]+", arg):
        return arg
    if "'" in arg and not re.search(r"[\"$`\\!]", arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def call_command(call: Call, env: tuple[tuple[str, str], ...] = ()) -> str:
    """The shell command equivalent to one call."""
    prefix = "".join(f"{k}={_quote(v)} " for k, v in env)
    return prefix + " ".join(["python", "-m", call.module, *map(_quote, call.args)])


def git_stamp() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout, or of $ZHCHAT_GIT_COMMIT / $ZHCHAT_GIT_DIRTY without git."""
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        dirty = os.environ.get("ZHCHAT_GIT_DIRTY")
        return (os.environ.get("ZHCHAT_GIT_COMMIT"),
                None if dirty is None else dirty not in ("0", ""))


# --- the benchmark's process ------------------------------------------------------------------
def _run_call(call: Call) -> tuple[int, str | None]:
    """Calls the entry point with the call's argv: (exit code, error text)."""
    module, _, fn = (call.entry or f"{call.module}:main").partition(":")
    sys.argv = [call.module, *call.args]
    try:
        rc = getattr(importlib.import_module(module), fn or "main")(list(call.args))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return rc, None if rc == 0 else f"exited {e.code}"
    except BaseException:  # noqa: BLE001 - the record says what failed
        return 1, traceback.format_exc()
    rc = rc if isinstance(rc, int) else 0  # dedup.main returns its summary
    return rc, None if rc == 0 else f"returned {rc}"


def _devices(framework: str) -> tuple[str | None, int | None]:
    if framework == "torch":
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), torch.cuda.device_count()
        return "cpu", 1
    if framework == "jax":
        import jax
        devices = jax.devices()
        return devices[0].device_kind, len(devices)
    return "cpu", os.cpu_count()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for p in VERSION_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def child(bench: Benchmark, info_path: str, log_path: str | None, own_group: bool = False
          ) -> None:
    """Runs the benchmark's calls (in the spawned process) and writes what the record needs
    beyond the result files to `info_path`. `own_group`: a process group of its own, so that a
    timeout also ends the processes it starts."""
    if own_group:
        os.setpgrp()
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.environ.update(dict(bench.env), ZHCHAT_BENCH_RUN=bench.name)  # emit() names its lines
    info: dict[str, Any] = {"calls": [], "error": None}
    for call in bench.calls:
        t0 = time.perf_counter()
        rc, error = _run_call(call)
        info["calls"].append({"rc": rc, "seconds": time.perf_counter() - t0})
        if rc:
            info["error"] = error
            break
    try:
        info["device_kind"], info["device_count"] = _devices(bench.framework)
    except Exception as e:  # noqa: BLE001 - a missing framework leaves the fields empty
        info["device_kind"], info["device_count"] = None, None
        info["device_error"] = repr(e)
    info["versions"] = _versions()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f)


# --- the runner ---------------------------------------------------------------------------------
def _prepare(bench: Benchmark, scratch: str) -> None:
    """Folders made; this benchmark's earlier output removed (appended records, its own
    convergence curve, its scratch run folders), so a record holds this run's numbers only."""
    shutil.rmtree(scratch, ignore_errors=True)
    for path in bench.results:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path.endswith("records.jsonl") and os.path.exists(path):
            os.remove(path)
    if bench.kind == "convergence":
        curves = os.path.join(os.path.dirname(bench.results[0]), "curves.jsonl")
        if os.path.exists(curves):
            with open(curves, encoding="utf-8") as f:
                keep = [ln for ln in f
                        if ln.strip() and json.loads(ln).get("system") != bench.label]
            with open(curves, "w", encoding="utf-8") as f:
                f.writelines(keep)


def read_results(patterns: Sequence[str], since: float) -> list[Any]:
    """Contents of the result files written since `since` (json lines, or one json document)."""
    out: list[Any] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if os.path.getmtime(path) < since - 1:
                continue  # an earlier run's file
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    out += [json.loads(ln) for ln in f if ln.strip()]
                else:
                    out.append(json.load(f))
    return out


def metrics(bench: Benchmark, results: list[Any]) -> dict[str, Any]:
    """The headline numbers of the results (convergence: this run's row of summary.json)."""
    if not results or not isinstance(results[0], dict):
        return {}
    first = results[0]
    if bench.kind == "convergence":
        return dict(first.get(bench.label) or {})
    return {k: first[k] for k in METRIC_KEYS if isinstance(first.get(k), (int, float))}


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    """Ends the benchmark's process and what it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        proc.join(10)
        if not proc.is_alive():
            return


def run_one(bench: Benchmark, *, command: str, scratch: str, log_dir: str | None = None,
            in_process: bool = False) -> dict[str, Any]:
    """Runs one rendered benchmark (`scratch`: its {scratch} folder) and returns its record."""
    _prepare(bench, scratch)
    commit, dirty = git_stamp()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log_path = None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(os.path.abspath(log_dir), f"{bench.name}.log")
    with tempfile.TemporaryDirectory() as tmp:
        info_path = os.path.join(tmp, "info.json")
        t0, since, status, exitcode = time.perf_counter(), time.time(), "ok", None
        if in_process:
            child(bench, info_path, None)
        else:  # the target by its module's name, also when this file runs as __main__
            target = importlib.import_module("zhchat.benchmarks.run").child
            proc = multiprocessing.get_context("spawn").Process(
                target=target, args=(bench, info_path, log_path, True))
            proc.start()
            try:
                proc.join(bench.timeout_s)
            except KeyboardInterrupt:
                _stop(proc)
                raise
            if proc.is_alive():
                status = "timeout"
                _stop(proc)
            exitcode = proc.exitcode
        info: dict[str, Any] = {}
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        elif status == "ok":
            status, info["error"] = "failed", f"the benchmark's process died (exit {exitcode})"
    if status == "ok" and info.get("error"):
        status = "failed"
    results = read_results(bench.results, since)
    versions = info.get("versions", {})
    return {
        "name": bench.name, "kind": bench.kind, "description": bench.description,
        "status": status, "error": info.get("error") or (
            f"over the {bench.timeout_s} s limit" if status == "timeout" else None),
        "commit": commit, "dirty": dirty, "date": date,
        "device_kind": info.get("device_kind"), "device_count": info.get("device_count"),
        "jax_version": versions.get("jax"), "versions": versions,
        "command": command, "calls": [call_command(c, bench.env) for c in bench.calls],
        "seconds": time.perf_counter() - t0,
        "call_seconds": [c["seconds"] for c in info.get("calls", [])],
        "log": log_path, "metrics": metrics(bench, results), "results": results,
    }


def runner_command(bench: Benchmark, args: argparse.Namespace) -> str:
    """The runner command reproducing one benchmark with this call's options."""
    parts = ["python", "-m", "zhchat.benchmarks.run", bench.name]
    for opt in ("steps", "data_root", "cache", "val_cache", "profile_dir"):
        value = getattr(args, opt)
        if opt == "steps" and bench.kind not in STEPPED_KINDS:
            continue
        if value is not None and value != PARSER_DEFAULTS.get(opt):
            parts.append(f"--{opt}={_quote(str(value))}")
    return " ".join(parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.run",
                                description="Runs named benchmarks; see benchmarks/registry.py.")
    p.add_argument("names", nargs="*", help="benchmark or group names (--list shows them)")
    p.add_argument("--list", action="store_true", help="print the names and groups, then exit")
    p.add_argument("--dry_run", action="store_true", help="print what would run, then exit")
    p.add_argument("--out", default=os.path.join(REPO, "out", "bench", "results.jsonl"),
                   help="append one stamped json line per benchmark here")
    p.add_argument("--steps", type=int, default=None, help="override the timed steps")
    p.add_argument("--repeat", type=int, default=1, help="run the whole list N times, in order")
    p.add_argument("--data_root", default=os.path.join(REPO, "out"),
                   help="holds bench/zc100m_lm_*, conv/, eval_data/, zc100m/, demo_data/, tok/, "
                        "t5pack/")
    p.add_argument("--cache", default=None, help="the packed LM train cache ({cache})")
    p.add_argument("--val_cache", default=None, help="its validation cache ({val_cache})")
    p.add_argument("--work_dir", default=os.path.join(REPO, "out", "bench", "work"),
                   help="outputs, one folder per benchmark ({work})")
    p.add_argument("--log_dir", default=None, help="each benchmark's stdout/stderr to NAME.log")
    p.add_argument("--profile_dir", default=None, help="trace train steps into DIR/NAME")
    p.add_argument("--in_process", action="store_true",
                   help="run in this process (debugging; no isolation, no time limit)")
    return p


PARSER_DEFAULTS = vars(_parser().parse_args([]))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # names and options in any order
    if args.list:
        width = max(map(len, registry.REGISTRY))
        for name, b in registry.REGISTRY.items():
            print(f"{name:{width}}  {b.kind:11} {b.description}")
        print("\ngroups:")
        for group, names in registry.GROUPS.items():
            print(f"  {group}: {' '.join(names)}")
        return 0
    if not args.names:
        _parser().error("name benchmarks or groups (--list shows them)")
    try:
        benches = registry.expand(args.names)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    failed = 0
    for bench in benches * max(args.repeat, 1):
        values = placeholders(args, bench.name)
        bench = render(bench, values, steps=args.steps, profile_dir=args.profile_dir)
        command = runner_command(bench, args)
        if args.dry_run:
            print(f"# {bench.name} ({bench.kind}): {bench.description}\n# {command}")
            for call in bench.calls:
                print(call_command(call, bench.env))
            print(f"# results: {' '.join(bench.results)}\n")
            continue
        print(f"== {bench.name}: {command}", flush=True)
        record = run_one(bench, command=command, scratch=values["scratch"], log_dir=args.log_dir,
                         in_process=args.in_process)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        failed += record["status"] != "ok"
        shown = {k: round(v, 4) if isinstance(v, float) else v
                 for k, v in list(record["metrics"].items())[:4]}
        print(f"   {record['status']} in {record['seconds']:.0f} s {shown}"
              + (f" {record['error'].strip().splitlines()[-1]}" if record["error"] else ""),
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
