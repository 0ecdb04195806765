"""`python -m zhchat.scripts.evaluate`: offline evaluation of a decoder or T5 checkpoint."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SUITES = "evals/all.gin"


def resolve(path: str) -> str:
    """A path (or glob) as given when it matches from the working directory, else relative to the
    repository root (as the presets' paths are)."""
    if os.path.isabs(path) or glob.glob(path):
        return path
    return os.path.join(REPO, path)


def main(argv: Sequence[str] | None = None) -> int:
    from zhchat.scripts.evaluate import report as report_lib
    from zhchat.scripts.evaluate import scoring, suites
    from zhchat.scripts.infer import load
    from zhchat.tasks import sources
    from zhchat.tasks.vocabulary import Vocabulary
    from zhchat.trainer import gin_cli

    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.evaluate", description=__doc__)
    p.add_argument("--run_dir", help="a training run (its config.gin and checkpoints/)")
    p.add_argument("--checkpoint_dir", help="checkpoints elsewhere than RUN_DIR/checkpoints")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--vocab", required=True, help="the SentencePiece model the run used")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, *.png")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--no_progress", action="store_true")
    p.epilog = ("Suites: --suite_gin=evals/cmmlu.gin (repeatable; default evals/all.gin), settings "
                "--gin.Suites.cmmlu_shots=[0] (scripts/evaluate/suites.py). Model: --gin_file and "
                "--gin.X=Y as for training when RUN_DIR has no config.gin.")
    raw = list(sys.argv[1:] if argv is None else argv)
    suite_files = [a.split("=", 1)[1] for a in raw if a.startswith("--suite_gin=")]
    raw = [a for a in raw if not a.startswith("--suite_gin=")]
    gin_files, bindings, rest = gin_cli.split_gin_args(raw)
    args = p.parse_args(rest)
    if not (args.run_dir or args.checkpoint_dir):
        p.error("give --run_dir (or --checkpoint_dir with --gin_file)")
    if not os.path.isfile(args.vocab):
        p.error(f"--vocab {args.vocab!r} does not exist")
    suite_bindings = [b for b in bindings if b.startswith("Suites.")]
    model_bindings = [b for b in bindings if not b.startswith("Suites.")]
    try:
        gin.clear_config()
        gin_cli.parse_gin(suite_files or [DEFAULT_SUITES], suite_bindings)
        config = suites.Suites()
        _check_paths(config)
        gin.clear_config()
        vocab = Vocabulary(args.vocab, extra_ids=100)
        model, params, step = load(args.run_dir, args.checkpoint_dir, gin_files, model_bindings,
                                   args.step)
    except (FileNotFoundError, ValueError, gin_cli.GinConfigError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if vocab.vocab_size > model.config.vocab_size:
        print(f"evaluate: {args.vocab} has {vocab.vocab_size} ids but the model's embedding has "
              f"{model.config.vocab_size}: wrong vocabulary for this checkpoint", file=sys.stderr)
        return 2
    scorer = scoring.Scorer(model, params, batch_size=args.batch_size, max_len=args.max_len,
                            progress=not args.no_progress)
    counter = sources.SkipCounter()
    t0 = time.time()
    results = suites.run(config, scorer, vocab, counter, resolve=resolve)
    report = {"checkpoint": args.checkpoint_dir or args.run_dir, "step": step,
              "model": type(model).__name__, "vocab": args.vocab, "results": results,
              "skipped": counter.as_dict(), "contexts_truncated": scorer.truncated,
              "seconds": time.time() - t0}
    for path in report_lib.write(report, args.out):
        print(f"wrote {path}")
    if counter.total:
        print(f"skipped records:\n{counter.report()}", file=sys.stderr)
    print(report_lib.markdown(report))
    return 0


def _check_paths(config) -> None:
    """Every configured data path exists, before the checkpoint loads."""
    from zhchat.tasks import sources

    missing = []
    for files, _, _ in config.lm_corpora:
        try:
            sources.expand_files(resolve(files))
        except FileNotFoundError:
            missing.append(f"language-modelling files {files!r}")
    if config.cmmlu_dir:
        for sub in (config.cmmlu_split, "dev"):
            if not os.path.isdir(os.path.join(resolve(config.cmmlu_dir), sub)):
                missing.append(f"CMMLU folder {os.path.join(config.cmmlu_dir, sub)!r}")
    for f in config.c3_files:
        try:
            sources.expand_files(resolve(f))
        except FileNotFoundError:
            missing.append(f"C3 files {f!r}")
    if missing:
        raise FileNotFoundError("missing evaluation data: " + "; ".join(missing) +
                                " (set the paths with --gin.Suites.<field>=...)")
