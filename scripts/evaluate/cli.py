"""`python -m zhchat.scripts.evaluate`: offline evaluation of a decoder or T5 checkpoint."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Sequence

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SUITES = "runs/eval.gin"


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
    from zhchat.gin_configs import cli as gin_cli

    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.evaluate", description=__doc__)
    p.add_argument("--run_dir", help="a training run (its config.gin and checkpoints/)")
    p.add_argument("--checkpoint_dir", help="checkpoints elsewhere than RUN_DIR/checkpoints")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--vocab", required=True, help="the SentencePiece model the run used")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, *.png")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--bucket", type=int, default=64,
                   help="rows are padded to a multiple of this many tokens (fewer compiles)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--params_under", default="",
                   help="the params' subtree in the checkpoint, e.g. 'policy' for a PPO run")
    rl = p.add_argument_group("RLHF suites")
    rl.add_argument("--rm_checkpoint", help="reward-model checkpoints (rl.cli reward) of this model")
    rl.add_argument("--pairs", help="preference jsonl glob: RM pairwise accuracy and the policy's "
                    "prompts (their held-back split: every 10th record)")
    rl.add_argument("--reference_checkpoint", help="a reference policy's checkpoints (e.g. SFT): "
                    "win rate by the reward model and KL to it")
    rl.add_argument("--max_prompt_len", type=int, default=256)
    rl.add_argument("--max_response_len", type=int, default=256)
    rl.add_argument("--policy_prompts", type=int, default=64)
    rl.add_argument("--max_decode_length", type=int, default=64)
    rl.add_argument("--samples_file", help="prompts (a line each, or jsonl {\"prompt\"}): chat "
                    "replies in the report")
    p.epilog = ("Suites: --gin_file=evals/cmmlu.gin or --suite_gin=... (repeatable; default "
                "runs/eval.gin: every "
                "suite), settings --gin.Suites.cmmlu_shots=[0] (scripts/evaluate/suites.py). Model: --gin_file and "
                "--gin.X=Y as for training when RUN_DIR has no config.gin.")
    raw = list(sys.argv[1:] if argv is None else argv)
    suite_files = [a.split("=", 1)[1] for a in raw if a.startswith("--suite_gin=")]
    raw = [a for a in raw if not a.startswith("--suite_gin=")]
    gin_files, bindings, rest = gin_cli.split_gin_args(raw)
    # suite files may come as --gin_file too (evals/*.gin, runs/eval.gin); the rest configure the model
    suite_files += [f for f in gin_files if _is_suite_file(f)]
    gin_files = [f for f in gin_files if not _is_suite_file(f)]
    args = p.parse_args(rest)
    if not (args.run_dir or args.checkpoint_dir):
        p.error("give --run_dir (or --checkpoint_dir with --gin_file)")
    if not os.path.isfile(args.vocab):
        p.error(f"--vocab {args.vocab!r} does not exist")
    for flag in ("rm_checkpoint", "reference_checkpoint", "samples_file"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            p.error(f"--{flag} {getattr(args, flag)!r} does not exist")
    if (args.rm_checkpoint or args.reference_checkpoint) and not args.pairs:
        p.error("--rm_checkpoint / --reference_checkpoint need --pairs (preference jsonl)")
    if args.reference_checkpoint and not args.rm_checkpoint:
        p.error("--reference_checkpoint needs --rm_checkpoint (the judge)")
    if args.pairs and not glob.glob(args.pairs):
        p.error(f"--pairs {args.pairs!r} matches no file")
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
        if args.params_under:
            from zhchat.rl.cli import load_params
            params = load_params(directory=args.checkpoint_dir or os.path.join(args.run_dir,
                                                                               "checkpoints"),
                                 model=model, step=args.step,
                                 under=tuple(args.params_under.split("/")))
    except (FileNotFoundError, ValueError, gin_cli.GinConfigError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if vocab.vocab_size > model.config.vocab_size:
        print(f"evaluate: {args.vocab} has {vocab.vocab_size} ids but the model's embedding has "
              f"{model.config.vocab_size}: wrong vocabulary for this checkpoint", file=sys.stderr)
        return 2
    from zhchat.trainer import partitioning

    scorer = scoring.Scorer(model, params, batch_size=args.batch_size, max_len=args.max_len,
                            bucket=args.bucket, partitioner=partitioning.Partitioner(),
                            progress=not args.no_progress)
    counter = sources.SkipCounter()
    t0 = time.time()
    results = suites.run(config, scorer, vocab, counter, resolve=resolve, vocab_path=args.vocab)
    results.update(_rl_suites(args, model, params, vocab, counter))
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


def _is_suite_file(path: str) -> bool:
    norm = path.replace(os.sep, "/")
    return "evals/" in norm or norm.endswith("runs/eval.gin")


def _rl_suites(args, model, params, vocab, counter) -> dict:
    """Reward-model accuracy, policy vs reference and chat samples, as the flags ask."""
    from zhchat.scripts.evaluate import rl_suites

    out = {}
    if args.rm_checkpoint:
        from zhchat.rl.cli import load_params
        from zhchat.tasks.preference_reader import PreferenceExamples, _pad
        from zhchat.rl.reward_model import RewardModel

        rm = RewardModel(backbone=model)
        rm_params = load_params(directory=args.rm_checkpoint, model=rm)
        pairs = PreferenceExamples(files=args.pairs, vocab=vocab, max_prompt_len=args.max_prompt_len,
                                   max_response_len=args.max_response_len, split="all")
        for reason, n in pairs.skips.as_dict().items():
            counter.add(f"pairs_{reason}", args.pairs, n)
        out["reward_model"] = rl_suites.reward_model_accuracy(
            rm, rm_params, pairs.examples, prompt_len=args.max_prompt_len,
            response_len=args.max_response_len, batch_size=args.batch_size)
        if args.reference_checkpoint:
            from zhchat.rl import rollout

            ref_params = load_params(directory=args.reference_checkpoint, model=model)
            held = PreferenceExamples(files=args.pairs, vocab=vocab,
                                      max_prompt_len=args.max_prompt_len, split="validation")
            prompts = [e["prompt"] for e in held.examples[:args.policy_prompts]]
            padded = np.asarray(rollout.left_pad(_pad(prompts, args.max_prompt_len), model.pad_id))
            out["policy"] = rl_suites.policy_vs_reference(
                model, params, ref_params, rm, rm_params, padded, eos_id=vocab.eos_id,
                max_decode_length=args.max_decode_length)
    if args.samples_file:
        prompts = rl_suites.read_prompts(args.samples_file, counter)
        out["samples"] = rl_suites.chat_samples(model, params, vocab, prompts,
                                                max_new_tokens=args.max_decode_length)
    return out


def _check_paths(config) -> None:
    """Every configured data path exists, before the checkpoint loads."""
    from zhchat.tasks import eval_sets, sources

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
    if config.fewclue_dir:
        unknown = sorted(set(config.fewclue_tasks) - set(eval_sets.FEWCLUE_TASKS))
        if unknown:
            raise ValueError(f"unknown FewCLUE tasks {unknown}; known: {eval_sets.FEWCLUE_TASKS}")
        for task in config.fewclue_tasks:
            for split in ("train", config.fewclue_split):
                path = os.path.join(resolve(config.fewclue_dir), task, f"{split}_few_all.json")
                if not os.path.isfile(path):
                    missing.append(f"FewCLUE file {path!r}")
    if missing:
        raise FileNotFoundError("missing evaluation data: " + "; ".join(missing) +
                                " (set the paths with --gin.Suites.<field>=...)")
