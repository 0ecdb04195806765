"""Preference pairs from an SFT run (Zero-Chatgpt's recipe): chosen = the gold reply of each SFT
dialogue, rejected = the SFT model's own reply to the same history (rl/pair_builder.py).

  python -m zhchat.scripts.build_pairs --run_dir=SFT_RUN --vocab=spm.model \
      --dialogues='sft/*.json' --format=alpaca --output=pairs.jsonl [--max_pairs=N]

The run's config.gin gives the model (or pass --gin_file/--gin.X=Y); its latest checkpoint gives
the parameters. Inputs (run folder and checkpoints, tokenizer, dialogue files, writable output
folder) are checked before the model is loaded; bad dialogues and unusable replies are counted
and printed with the result, never dropped silently. Exit 2 on bad input, 1 if no pair was made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def _check_inputs(args: argparse.Namespace) -> list[str]:
    """The input files, after every check that needs no model."""
    from zhchat.tasks import sources

    if not os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
        raise ValueError(f"{args.run_dir} has no checkpoints/ folder: pass an SFT run folder")
    if not os.path.isfile(args.vocab):
        raise ValueError(f"tokenizer {args.vocab} not found")
    files = sources.expand_files([f for f in args.dialogues.split(",") if f])
    if not files:
        raise ValueError(f"--dialogues={args.dialogues!r} matches no file")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, f".build_pairs_probe_{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):  # a read-only mount passes os.access as root
        pass
    os.remove(probe)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    from zhchat.gin_configs import cli as gin_cli

    gin_files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.build_pairs",
                                description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="the SFT run folder")
    p.add_argument("--vocab", required=True, help="the SentencePiece model the run used")
    p.add_argument("--dialogues", required=True, help="dialogue files or globs (comma-separated)")
    p.add_argument("--format", choices=("alpaca", "sharegpt"), default="alpaca")
    p.add_argument("--output", required=True, help="the pairs jsonl to write")
    p.add_argument("--system", default=None, help="system message opening every dialogue")
    p.add_argument("--max_pairs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_prompt_len", type=int, default=256)
    p.add_argument("--max_decode_length", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(rest)
    try:
        files = _check_inputs(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from zhchat.rl import pair_builder
    from zhchat.scripts.infer import load
    from zhchat.tasks import sft_sources, sources
    from zhchat.tasks.vocabulary import Vocabulary

    try:
        model, params, step = load(args.run_dir, None, gin_files, bindings, None)
    except (gin_cli.GinConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.run_dir} step {step}", file=sys.stderr)
    read_skips = sources.SkipCounter()
    dialogues = sft_sources.READERS[args.format](files, read_skips, system=args.system)
    try:
        out = pair_builder.build_pairs(
            model=model, params=params, vocab=Vocabulary(args.vocab), dialogues=dialogues,
            output_path=args.output, batch_size=args.batch_size,
            max_prompt_len=args.max_prompt_len, max_decode_length=args.max_decode_length,
            temperature=args.temperature, top_p=args.top_p, max_pairs=args.max_pairs,
            seed=args.seed)
    except ValueError as e:  # option checks that need the model (e.g. lengths past max_len)
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"pairs": out["pairs"], "output": args.output, "skipped": out["skipped"],
              "skipped_reading": read_skips.as_dict()}
    for report in (read_skips.report(), out["report"]):
        if report:
            print(report, file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0 if out["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
