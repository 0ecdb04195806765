"""Look at what a task, mixture or cache feeds the model: decoded examples and length statistics.

  python -m zhchat.scripts.inspect --gin_file=tasks/demo_lm.gin --gin.VOCAB_PATH="'spm.model'" \
      --task=zh_demo_lm --feature_lengths targets=512 --num_examples 3 --stats_examples 500
  python -m zhchat.scripts.inspect --cache_dir=cache/demo

For each token feature: count, mean / median / p95 / max tokens (non-padding tokens for packed caches).
For mixtures, the realized share of each task among the examples read (seqio's own sampling, redone
with a task tag). A cache is read with the TF-free reader and decoded segment by segment.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from zhchat.gin_configs import cli as gin_cli
from zhchat.tasks import cache_reader, lm
from zhchat.tasks.vocabulary import Vocabulary


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    a = np.asarray(lengths, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def format_stats(stats: Mapping[str, Mapping[str, float]]) -> str:
    rows = [f"  {k:<24} count={s['count']:<7} mean={s['mean']:<9.1f} median={s['median']:<7.0f} "
            f"p95={s['p95']:<7.0f} max={s['max']}" for k, s in sorted(stats.items())]
    return "\n".join(rows)


def _task_examples(name: str, split: str, sequence_length, seed: int
                   ) -> Iterator[tuple[str, dict]]:
    """(task name, numpy example) pairs; mixtures sample exactly as seqio's Mixture.get_dataset."""
    import seqio
    import tensorflow as tf

    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Task):
        ds = provider.get_dataset(sequence_length, split=split, shuffle=False, num_epochs=1)
        for ex in ds.as_numpy_iterator():
            yield name, ex
        return
    tasks = [t for t in provider.tasks if split in t.splits]
    keys = set(provider.output_features)
    datasets = [provider.get_task_dataset(t, keys, sequence_length, split, False, False, seed, None,
                                          1, True, False).map(
                    lambda x, i=i: {**x, "_task": tf.constant(i)}) for i, t in enumerate(tasks)]
    # seqio keeps no task tag in mixed examples: redo its sampling (same rates, same seed) with one.
    rates = provider._get_all_mixing_rates(tasks)  # noqa: SLF001 (no public accessor)
    mixed = provider._sample_fn(datasets, rates, seed)  # noqa: SLF001
    for ex in mixed.as_numpy_iterator():
        yield tasks[int(ex.pop("_task"))].name, ex


def _vocabularies(name: str) -> dict:
    import seqio

    return {k: f.vocabulary for k, f in seqio.get_mixture_or_task(name).output_features.items()}


def inspect_task(name: str, *, split: str, sequence_length, num_examples: int, stats_examples: int,
                 seed: int, out=None) -> dict:
    out = out or sys.stdout
    vocabs = _vocabularies(name)
    lengths: dict[str, list[int]] = collections.defaultdict(list)
    per_task: collections.Counter[str] = collections.Counter()
    n = 0
    for n, (task_name, ex) in enumerate(_task_examples(name, split, sequence_length, seed), 1):
        per_task[task_name] += 1
        for k, v in ex.items():
            if isinstance(v, np.ndarray) and v.ndim == 1 and np.issubdtype(v.dtype, np.integer):
                lengths[k].append(int(v.size))
        if n <= num_examples:
            print(f"--- example {n} ({task_name})", file=out)
            for k, vocab in vocabs.items():
                if k in ex:
                    print(f"[{k}] {vocab.decode(ex[k].tolist())}", file=out)
        if n >= max(num_examples, stats_examples):
            break
    return _report(name, split, n, lengths, per_task, out)


def inspect_cache(cache_dir: str, *, num_examples: int, stats_examples: int, seed: int,
                  out=None) -> dict:
    out = out or sys.stdout
    meta = cache_reader.cache_metadata(cache_dir)
    vocab_info = next(iter(meta["vocabulary"].values()))
    vocab = Vocabulary(vocab_info["vocab_path"], extra_ids=vocab_info["extra_ids"], chat_tokens=())
    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=1, seed=seed, num_epochs=1,
                                          shard_index=0, shard_count=1, drop_remainder=False)
    lengths: dict[str, list[int]] = collections.defaultdict(list)
    n = 0
    for n, batch in enumerate(it, 1):
        ex = {k: v[0] for k, v in batch.items()}
        for prefix in ("encoder", "decoder"):
            if f"{prefix}_segment_ids" in ex:  # non-padding tokens and documents per packed row
                lengths[f"{prefix}_tokens"].append(int(np.count_nonzero(ex[f"{prefix}_segment_ids"])))
                lengths[f"{prefix}_segments"].append(int(ex[f"{prefix}_segment_ids"].max()))
        if n <= num_examples:
            print(f"--- example {n}", file=out)
            for prefix, key in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
                if key in ex:
                    for seg, text in _segments(ex[key], ex.get(f"{prefix}_segment_ids"), vocab):
                        print(f"[{key} segment {seg}] {text}", file=out)
        if n >= max(num_examples, stats_examples):
            break
    print(f"cache {cache_dir}: task {meta['task']}/{meta['split']}, converter {meta['converter']}, "
          f"{meta['num_examples']} packed examples", file=out)
    return _report(meta["task"], meta["split"], n, lengths, collections.Counter(), out)


def _segments(tokens: np.ndarray, segment_ids: np.ndarray | None, vocab: Vocabulary
              ) -> Iterable[tuple[int, str]]:
    if segment_ids is None:
        yield 1, vocab.decode(tokens.tolist(), stop_at_eos=False)
        return
    for seg in [s for s in np.unique(segment_ids) if s > 0]:
        yield int(seg), vocab.decode(tokens[segment_ids == seg].tolist(), stop_at_eos=False)


def _report(name: str, split: str, n: int, lengths, per_task, out) -> dict:
    if n == 0:
        raise ValueError(f"{name}/{split} yielded no examples")
    stats = {k: length_stats(v) for k, v in lengths.items()}
    print(f"=== {name}/{split}: {n} examples read; tokens per feature:", file=out)
    print(format_stats(stats), file=out)
    result = {"examples": n, "lengths": stats}
    if len(per_task) > 1 or (per_task and name not in per_task):
        shares = {t: c / n for t, c in per_task.most_common()}
        print("realized task proportions: " + ", ".join(f"{t}={s:.3f}" for t, s in shares.items()),
              file=out)
        result["proportions"] = shares
    return result


def main(argv: Sequence[str] | None = None) -> int:
    gin_files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", help="registered seqio task or mixture")
    group.add_argument("--cache_dir", help="a cache exported by zhchat.tasks.cache")
    p.add_argument("--split", default="train")
    p.add_argument("--feature_lengths", type=lm.feature_lengths_arg, default=None,
                   help="e.g. targets=512 (default: no truncation or splitting)")
    p.add_argument("--num_examples", type=int, default=3, help="examples to print decoded")
    p.add_argument("--stats_examples", type=int, default=200, help="examples to compute stats on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(rest)
    if args.cache_dir:
        inspect_cache(args.cache_dir, num_examples=args.num_examples,
                      stats_examples=args.stats_examples, seed=args.seed)
    else:
        lm.parse_gin(gin_files, bindings)
        inspect_task(args.task, split=args.split, sequence_length=args.feature_lengths,
                     num_examples=args.num_examples, stats_examples=args.stats_examples,
                     seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
