"""Training curves as a PNG from runs' `metrics.jsonl` (what the trainer writes in its run dir).

    python -m zhchat.scripts.plot RUN_DIR [RUN_DIR...] [--out=curves.png|FOLDER]
        [--metrics=train/loss,eval/loss,...] [--log_loss] [--smooth=0.9]

One panel per metric present in any run (default: train loss, eval loss, learning rate, MFU,
tokens/s), the runs overlaid and named by their folder. A restarted run's replayed steps count
once (the last record wins); unreadable lines are skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_METRICS = ("train/loss", "eval/loss", "train/learning_rate", "train/mfu",
                   "train/tokens_per_sec")
TITLES = {"train/loss": "train loss", "eval/loss": "eval loss",
          "train/learning_rate": "learning rate", "train/mfu": "MFU",
          "train/tokens_per_sec": "tokens/s"}
PANEL_INCHES, DPI, MAX_COLUMNS = (5.0, 3.5), 100, 3


class MetricsError(ValueError):
    """A run dir that has no readable metrics.jsonl."""


@dataclass
class Run:
    """One run's series: {metric: [(step, value), ...]} sorted by step, one value per step."""
    name: str
    path: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)

    def skip_message(self) -> str | None:
        """e.g. 'skipped 1 unreadable line in RUN/metrics.jsonl:17', or None."""
        if not self.bad_lines:
            return None
        n, shown = len(self.bad_lines), ",".join(map(str, self.bad_lines[:10]))
        more = ",..." if n > 10 else ""
        return f"skipped {n} unreadable line{'s' if n > 1 else ''} in {self.path}:{shown}{more}"


def load_run(run_dir: str, name: str | None = None) -> Run:
    """Reads `run_dir/metrics.jsonl` (or that file itself). A record replaces an earlier one of
    the same step and kind (train/ or eval/ keys): a resumed run logs those steps again."""
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MetricsError(f"{run_dir}: no metrics.jsonl (not a run dir, or nothing logged yet)")
    folder = os.path.dirname(os.path.abspath(path))
    run = Run(name or os.path.basename(folder), path)
    latest: dict[tuple[int, tuple[str, ...]], dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = record.pop("step")
                if isinstance(step, bool) or not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, TypeError, KeyError, AttributeError):
                run.bad_lines.append(number)
                continue
            kind = tuple(sorted({k.split("/", 1)[0] for k in record}))
            latest[(step, kind)] = record
    for (step, _), record in sorted(latest.items(), key=lambda item: item[0][0]):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.series.setdefault(key, []).append((step, float(value)))
    return run


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average; non-finite values stay as they are
    and do not enter the average."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight ** n))
    return out


def smoothed(metric: str) -> bool:
    """Whether --smooth applies: the noisy per-window training losses."""
    return metric.startswith("train/") and metric.endswith(("loss", "cross_entropy"))


def plotted_series(runs: Sequence[Run], metrics: Sequence[str], smooth: float = 0.0
                   ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{metric: {run name: (steps, values)}}: exactly the lines drawn, for metrics present in
    at least one run (smoothed ones after the EMA)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for metric in metrics:
        lines = {}
        for run in runs:
            if run.series.get(metric):
                steps, values = (list(x) for x in zip(*run.series[metric]))
                if smooth and smoothed(metric):
                    values = ema(values, smooth)
                lines[run.name] = (steps, values)
        if lines:
            out[metric] = lines
    return out


def figure_pixels(num_panels: int) -> tuple[int, int]:
    """(width, height) of the PNG for `num_panels` panels, up to MAX_COLUMNS per row."""
    cols = min(num_panels, MAX_COLUMNS)
    rows = -(-num_panels // cols)
    return round(cols * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def plot(runs: Sequence[Run], out: str, metrics: Sequence[str] = DEFAULT_METRICS, *,
         smooth: float = 0.0, log_loss: bool = False) -> dict:
    """Writes the PNG `out`; returns what `plotted_series` gave (what was drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    drawn = plotted_series(runs, metrics, smooth)
    if not drawn:
        raise MetricsError(f"none of {', '.join(metrics)} is in the runs given")
    cols = min(len(drawn), MAX_COLUMNS)
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, dpi=DPI,
                             figsize=(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]))
    colors = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, (metric, lines) in zip(axes.flat, drawn.items()):
        for run in runs:
            if run.name not in lines:
                continue
            steps, values = lines[run.name]
            if smooth and smoothed(metric):  # the raw curve faintly under the smoothed one
                ax.plot(steps, [v for _, v in run.series[metric]], color=colors[run.name],
                        alpha=0.25, linewidth=0.8)
            ax.plot(steps, values, color=colors[run.name], label=run.name,
                    marker="o" if len(steps) < 30 else None, markersize=3)
        if log_loss and metric.endswith(("loss", "cross_entropy")):
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.4g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, format="png")
    plt.close(fig)
    return drawn


def _names(run_dirs: Sequence[str]) -> list[str]:
    """Legend names: each folder's basename, with its parent where two basenames collide."""
    folders = [os.path.abspath(d if os.path.isdir(d) else os.path.dirname(d) or ".")
               for d in run_dirs]
    base = [os.path.basename(f) for f in folders]
    return [os.path.join(os.path.basename(os.path.dirname(f)), b) if base.count(b) > 1 else b
            for f, b in zip(folders, base)]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 when the PNG is written, 2 for bad input (no file, nothing to draw)."""
    parser = argparse.ArgumentParser(prog="python -m zhchat.scripts.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="curves.png", help="PNG path, or a folder for curves.png")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated metrics.jsonl keys, one panel each")
    parser.add_argument("--log_loss", action="store_true", help="log-scale y axis for losses")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA weight in [0, 1) for the train losses (e.g. 0.9)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        parser.error("--smooth must be in [0, 1)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    out = args.out
    if os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "curves.png")
    try:
        runs = [load_run(d, name) for d, name in zip(args.run_dirs, _names(args.run_dirs))]
        for run in runs:
            if message := run.skip_message():
                print(message, file=sys.stderr)
            if not run.series:
                print(f"{run.path}: no records", file=sys.stderr)
        drawn = plot(runs, out, metrics, smooth=args.smooth, log_loss=args.log_loss)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    absent = [m for m in metrics if m not in drawn]
    if absent:
        print(f"not in any run (no panel): {', '.join(absent)}", file=sys.stderr)
    print(f"wrote {out}: {len(drawn)} panel(s), {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
