"""Complete prompts with a trained checkpoint: batched, jitted KV-cache decoding.

    python -m zhchat.scripts.infer --run_dir=runs/demo/pretrain/run --vocab=runs/demo/vocab/spm.model \
        --input=prompts.txt [--output=completions.jsonl] [--temperature=0.8 --top_k=20]
    echo "子曰：" | python -m zhchat.scripts.infer --run_dir=... --vocab=... --input=-

The model is rebuilt from the run's saved gin config (`<run_dir>/config.gin`) or from `--gin_file`
/`--gin.KEY=VALUE` (e.g. a model preset), and only the parameters are restored from the latest (or
`--step`) checkpoint, onto however many devices this machine has. Works for the decoder (prompt ->
continuation) and the encoder-decoder (input -> target, `--beam_size` for beam search).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, TextIO

import numpy as np


def read_prompts(stream: TextIO) -> tuple[list[str], int]:
    """Non-empty lines (one prompt per line; `\\n` inside a prompt may be written as a literal
    backslash-n) and the count of blank lines skipped."""
    prompts, skipped = [], 0
    for line in stream:
        text = line.rstrip("\n").replace("\\n", "\n")
        if text.strip():
            prompts.append(text)
        else:
            skipped += 1
    return prompts, skipped


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def encode_batch(vocab: Any, texts: list[str], *, left_pad: bool, append_eos: bool) -> np.ndarray:
    """Tokenized texts padded with 0 to one width (left for decoder prompts, right for encoders)."""
    from zhchat.tasks.vocabulary import pad_token_rows

    ids = [vocab.encode(t) + ([vocab.eos_id] if append_eos else []) for t in texts]
    return pad_token_rows(ids, left=left_pad)


def load(run_dir: str | None, checkpoint_dir: str | None, gin_files: list[str],
         bindings: list[str], step: int | None) -> tuple[Any, Any, int]:
    """(model wrapper, restored params, step) from gin + the checkpoint's params only."""
    import jax

    from zhchat.trainer import checkpoints as ckpt_lib
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import partitioning

    files = list(gin_files)
    if run_dir and not files:
        config = os.path.join(run_dir, "config.gin")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{config} not found: pass --gin_file=<model preset> (and the "
                                    "bindings the run used, e.g. --gin.VOCAB_SIZE=...)")
        files = [config]
    gin_cli.parse_gin(files, bindings)
    model = gin_cli.evaluate_macro("MODEL")
    directory = checkpoint_dir or os.path.join(run_dir or ".", "checkpoints")
    params, restored_step = ckpt_lib.restore_params(
        directory, model, partitioning.Partitioner(), jax.random.key(0), step=step)
    return model, params, restored_step


def main(argv: list[str] | None = None) -> int:
    from zhchat.gin_configs import cli as gin_cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        gin_files, bindings, rest = gin_cli.split_gin_args(argv)
    except gin_cli.GinConfigError as e:
        print(e, file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", help="a training run directory (config.gin + checkpoints/)")
    p.add_argument("--checkpoint_dir", help="checkpoints folder (default <run_dir>/checkpoints)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--vocab", required=True, help="SentencePiece model file")
    p.add_argument("--input", default="-", help="prompts file, one per line ('-' = stdin)")
    p.add_argument("--output", default=None, help="write jsonl here (default: print)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_decode_length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--beam_size", type=int, default=None, help="beam search (encoder-decoder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(rest)
    if not args.run_dir and not args.checkpoint_dir:
        p.error("give --run_dir or --checkpoint_dir")

    import jax

    from zhchat.models.encdec_model import EncoderDecoderModel
    from zhchat.tasks.vocabulary import Vocabulary

    try:
        vocab = Vocabulary(args.vocab, extra_ids=100)
        model, params, step = load(args.run_dir, args.checkpoint_dir, gin_files, bindings,
                                   args.step)
    except (FileNotFoundError, ValueError, gin_cli.GinConfigError) as e:
        print(f"infer: {e}", file=sys.stderr)
        return 2
    if vocab.vocab_size > model.config.vocab_size:
        print(f"infer: the vocabulary {args.vocab} has {vocab.vocab_size} ids but the model's "
              f"embedding has {model.config.vocab_size}: wrong vocabulary for this checkpoint",
              file=sys.stderr)
        return 2
    encdec = isinstance(model, EncoderDecoderModel)
    if args.input == "-":
        prompts, skipped = read_prompts(sys.stdin)
    else:
        with open(args.input, encoding="utf-8") as f:
            prompts, skipped = read_prompts(f)
    if skipped:
        print(f"infer: skipped {skipped} blank line(s)", file=sys.stderr)
    print(f"infer: restored step {step}; completing {len(prompts)} prompt(s)", file=sys.stderr)
    decode = dict(max_decode_length=args.max_decode_length, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p)
    if encdec:
        decode["beam_size"] = args.beam_size
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    rng = jax.random.key(args.seed)
    for i, chunk in enumerate(batches(prompts, args.batch_size)):
        tokens = encode_batch(vocab, chunk, left_pad=not encdec, append_eos=encdec)
        key = "encoder_input_tokens" if encdec else "decoder_input_tokens"
        result = model.predict_batch(params, {key: tokens}, jax.random.fold_in(rng, i), **decode)
        for prompt, row in zip(chunk, np.asarray(result).tolist()):
            completion = vocab.decode(row, stop_at_eos=True) if row else ""
            if out:
                out.write(json.dumps({"prompt": prompt, "completion": completion},
                                     ensure_ascii=False) + "\n")
            else:
                print(f"{prompt}\t{completion}".replace("\n", "\\n"), flush=True)
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
