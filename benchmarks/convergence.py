"""Convergence side by side: zhchat and the HF transformers reference on the same cache rows.

Both read the same packed cache through the same reader (same seed, so the same rows in the same
order), with the same optimizer, schedule, clipping, z-loss and batch size: ours through the
trainer (`trainer.train`, gin-configured like the CLI), HF's `LlamaForCausalLM` /
`T5ForConditionalGeneration` through benchmarks/hf_trainer.py. Each starts from its own default
initialisation (`--hf_init=ours` copies our initial parameters into the HF model instead). Writes
`curves.jsonl` (one row per log / eval of each system), `summary.json`, `table.md` and
`convergence.png` to `--out`.

    python -m zhchat.benchmarks.convergence --gin_file=models/decoder_100m.gin \
      --train_cache=out/conv/dec_train --eval_cache=out/conv/dec_val --steps=1200 \
      --batch_size=32 --warmup_steps=100 --eval_every=200 --eval_batches=10 --out=out/conv/dec
    python -m zhchat.benchmarks.convergence --plot_only --out=out/conv/dec   # re-draw from curves

Hyperparameters come from `runs/pretrain.gin` and the flags, then `--gin.K=V` overrides; the HF run
reads them back from gin, so both always train with the same values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import gin
import numpy as np

from zhchat.gin_configs import cli as gin_cli

RECIPE_FILE = "runs/pretrain.gin"
SYSTEMS = ("ours", "hf")


def _bindings(args: argparse.Namespace) -> list[str]:
    """The run's gin bindings: data, shapes, schedule and logging from the flags."""
    b = [f"TRAIN_CACHE_DIR = '{args.train_cache}'", f"NUM_STEPS = {args.steps}",
         f"BATCH_SIZE = {args.batch_size}", f"train.seed = {args.seed}",
         f"RUN_DIR = '{os.path.join(args.out, 'ours_run')}'",
         f"train.log_every = {args.log_every}", "train.checkpoint_every = 0",
         "train.keep_checkpoints = 0", "train.progress_bar = False",
         f"make_schedule.warmup_steps = {args.warmup_steps}",
         f"make_schedule.peak_value = {args.peak_lr}"]
    if args.eval_cache:
        b += [f"EVAL_CACHE_DIR = '{args.eval_cache}'",
              "train.eval_data = @eval/make_cache_iterator",
              f"train.eval_every = {args.eval_every}", f"train.eval_steps = {args.eval_batches}"]
    return b


def parse_config(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    gin.clear_config()
    gin_cli.parse_gin(list(args.gin_file) + [args.recipe], _bindings(args) + list(overrides))


def _query(name: str, default: Any) -> Any:
    """A bound value (a macro reference is evaluated), or `default` when unbound."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return default
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn()
    return value


def recipe_from_gin(model: Any) -> Any:
    """The optimizer/loss settings our trainer is bound with, for the HF side."""
    from zhchat.benchmarks import hf_trainer
    from zhchat.trainer import optimizers

    if _query("make_optimizer.name", "adamw") != "adamw":
        raise ValueError("the HF reference trains with AdamW only; bind make_optimizer.name='adamw'")
    schedule = optimizers.make_schedule()
    return hf_trainer.Recipe(
        schedule=lambda t: float(schedule(t)), weight_decay=_query("make_optimizer.weight_decay", 0.1),
        b1=_query("make_optimizer.b1", 0.9), b2=_query("make_optimizer.b2", 0.95),
        eps=_query("make_optimizer.eps", 1e-8), clip_norm=_query("make_optimizer.clip_norm", 1.0),
        z_loss=model.z_loss)


def _iterator(cache_dir: str, *, batch_size: int, seed: int, shuffle: bool):
    from zhchat.tasks import cache_reader
    return cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=batch_size, seed=seed,
                                            shuffle=shuffle, num_epochs=None, shard_index=0,
                                            shard_count=1)


def run_ours(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    from zhchat.trainer import train as train_lib

    parse_config(args, overrides)
    summary = train_lib.train()
    keep = ("step", "loss", "cross_entropy", "z_loss", "accuracy", "tokens_per_sec", "mfu")
    rows = [{"system": "ours", **{k: r[k] for k in keep if k in r}} for r in summary["history"]]
    rows += [{"system": "ours", "step": r["step"], "eval_cross_entropy": r["cross_entropy"]}
             for r in summary["eval_history"]]
    return rows


def initial_params(model: Any, first_batch: dict, seed: int) -> Any:
    """Our trainer's initial parameters for `seed` (the same key split as trainer.train)."""
    import flax.linen as nn
    import jax

    init_rng, _ = jax.random.split(jax.random.key(seed))
    shapes = {k: np.asarray(v).shape for k, v in first_batch.items()}
    return jax.device_get(nn.unbox(model.init_params(init_rng, shapes)))


def build_hf_model(model: Any, *, init: str, first_batch: dict, seed: int) -> Any:
    """The HF model of our preset: HF's default init, or (`init="ours"`) our initial params.
    Eager attention for T5: its relative-position bias and our additive masks stay fp32 under
    bf16 autocast."""
    import torch
    from zhchat.benchmarks import hf_trainer
    from zhchat.scripts import hf_convert

    torch.manual_seed(seed)
    is_t5 = hasattr(model.config, "d_model")
    state = None
    if init == "ours":
        params = initial_params(model, first_batch, seed)
        state = (hf_convert.t5_to_hf if is_t5 else hf_convert.decoder_to_hf)(params, model.config)
    return hf_trainer.reference_model(model.config, attention="eager" if is_t5 else "sdpa",
                                      state_dict=state)


def run_hf(args: argparse.Namespace, overrides: Sequence[str]) -> list[dict]:
    import torch
    from zhchat.benchmarks import hf_trainer

    parse_config(args, overrides)
    model = gin_cli.evaluate_macro("MODEL")
    recipe = recipe_from_gin(model)
    batch_size = _query("train.batch_size", None)
    train_it = _iterator(args.train_cache, batch_size=batch_size, seed=args.seed, shuffle=True)
    start = train_it.get_state()  # peek at the first batch's shapes, then rewind (as train() does)
    first = next(train_it)
    train_it.set_state(start)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = device == "cuda" and str(getattr(model.config, "dtype", "float32")) == "bfloat16"
    hf = build_hf_model(model, init=args.hf_init, first_batch=first, seed=args.seed)
    evaluator = None
    if args.eval_cache:
        it = _iterator(args.eval_cache, batch_size=batch_size, seed=args.seed, shuffle=False)
        evaluator = hf_trainer.Evaluator([next(it) for _ in range(args.eval_batches)],
                                         device=device, autocast=autocast)
    tokens = int(np.prod(np.asarray(first["decoder_input_tokens"]).shape))
    result = hf_trainer.train(hf, train_it, recipe, num_steps=args.steps, device=device,
                              log_every=args.log_every, eval_every=args.eval_every,
                              evaluator=evaluator, autocast=autocast,
                              on_log=lambda r: print(f"hf {r}", flush=True))
    rows = [{"system": "hf", **r, "tokens_per_sec": tokens / r["seconds_per_step"]}
            for r in result["history"]]
    rows += [{"system": "hf", "step": r["step"], "eval_cross_entropy": r["cross_entropy"]}
             for r in result["eval_history"]]
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per system: final train cross-entropy (last log) and eval cross-entropy per eval step."""
    out = {}
    for system in sorted({r["system"] for r in rows}):
        train = [r for r in rows if r["system"] == system and "cross_entropy" in r]
        evals = [r for r in rows if r["system"] == system and "eval_cross_entropy" in r]
        out[system] = {"final_train_cross_entropy": train[-1]["cross_entropy"] if train else None,
                       "eval": {r["step"]: r["eval_cross_entropy"] for r in evals},
                       "final_eval_cross_entropy": evals[-1]["eval_cross_entropy"] if evals else None}
    if {"ours", "hf"} <= set(out) and out["ours"]["final_eval_cross_entropy"] is not None:
        out["eval_gap_ours_minus_hf"] = (out["ours"]["final_eval_cross_entropy"]
                                        - out["hf"]["final_eval_cross_entropy"])
    return out


def table(rows: list[dict], *, every: int) -> str:
    """Markdown: train cross-entropy (window mean) and held-out cross-entropy per system."""
    systems = sorted({r["system"] for r in rows})
    train = {(r["system"], r["step"]): r["cross_entropy"] for r in rows if "cross_entropy" in r}
    evals = {(r["system"], r["step"]): r["eval_cross_entropy"] for r in rows
             if "eval_cross_entropy" in r}
    steps = sorted({s for _, s in evals} | {s for _, s in train if s % every == 0})
    head = ["step"] + [f"{s} train CE" for s in systems] + [f"{s} held-out CE" for s in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for step in steps:
        cells = [str(step)] + [fmt(train.get((s, step))) for s in systems]
        cells += [fmt(evals.get((s, step))) for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, *, title: str) -> bool:
    """Train (thin) and held-out (markers) cross-entropy per system; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (re-draw later with --plot_only)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, system in enumerate(sorted({r["system"] for r in rows})):
        color = f"C{i}"
        train = [(r["step"], r["cross_entropy"]) for r in rows
                 if r["system"] == system and "cross_entropy" in r]
        evals = [(r["step"], r["eval_cross_entropy"]) for r in rows
                 if r["system"] == system and "eval_cross_entropy" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1, alpha=0.7, label=f"{system} train")
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", lw=2, label=f"{system} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out: str, *, title: str, every: int) -> dict:
    summary = summarize(rows)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(f"{title}\n\n" + table(rows, every=every))
    plot(rows, os.path.join(out, "convergence.png"), title=title)
    return summary


def _check_inputs(args: argparse.Namespace) -> None:
    from zhchat.tasks import cache_reader

    for cache in filter(None, (args.train_cache, args.eval_cache)):
        cache_reader.cache_metadata(cache)  # clear error before any model is built
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        raise PermissionError(f"--out {args.out!r} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    files, overrides, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.convergence")
    p.add_argument("--recipe", default=RECIPE_FILE,
                   help="run gin file with the optimizer/schedule (AdamW), after --gin_file")
    p.add_argument("--train_cache")
    p.add_argument("--eval_cache", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--peak_lr", type=float, default=3e-4)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="ours,hf", help="comma-separated subset of ours,hf")
    p.add_argument("--hf_init", choices=("hf", "ours"), default="hf")
    p.add_argument("--name", default=None, help="row label in curves.jsonl (default: the system)")
    p.add_argument("--plot_only", action="store_true")
    args = p.parse_args(rest)
    args.gin_file = files
    curves = os.path.join(args.out, "curves.jsonl")
    title = f"{', '.join(os.path.basename(f) for f in files) or 'convergence'}: {args.steps} steps"
    if not args.plot_only:
        systems = [s for s in args.systems.split(",") if s]
        unknown = set(systems) - set(SYSTEMS)
        if unknown or not args.train_cache:
            p.error(f"need --train_cache and systems from {SYSTEMS} (got {sorted(unknown)})")
        try:
            _check_inputs(args)
            parse_config(args, overrides)  # gin errors now, before minutes of training
        except (gin_cli.GinConfigError, FileNotFoundError, ValueError, PermissionError) as e:
            print(str(e), file=sys.stderr)
            return 2
        for system in systems:
            rows = (run_ours if system == "ours" else run_hf)(args, overrides)
            with open(curves, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({**r, "system": args.name or r["system"]}) + "\n")
    with open(curves, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summary = write_outputs(rows, args.out, title=title, every=args.eval_every or args.log_every)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
