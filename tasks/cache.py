"""Export a seqio task/mixture split to ArrayRecord shards of packed examples (read TF-free by Grain).

Each packed example (the output of a seqio feature converter with pack=True) becomes one record: the
int32 arrays of its model features, in the order listed in metadata.json, concatenated (fixed lengths,
so the reader splits by offsets; no TF, no protobuf). Examples go round-robin to `num_shards` files.
`metadata.json` is written last, so a directory without it is an unfinished export.
`max_examples` (`--max_examples`) caches only the first N packed examples of the split (in file
order, so a prefix of the uncapped export), e.g. to fit a size budget; bytes on disk per example
depend on the feature lengths (int32, zstd-compressed per record by ArrayRecord's default options).

CLI: python -m zhchat.tasks.cache --gin_file=tasks/demo_lm.gin --gin.VOCAB_PATH="'spm.model'" \
        --task=zh_demo_lm --split=train --output_dir=cache/demo --feature_lengths targets=512 \
        --converter=decoder --num_shards=4 [--max_examples=N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Sequence

import numpy as np
import seqio
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from zhchat.gin_configs import cli as gin_cli
from zhchat.tasks import cache_reader, lm

CONVERTERS = {
    "decoder": lambda: seqio.DecoderFeatureConverter(pack=True),
    "encdec": lambda: seqio.EncDecFeatureConverter(pack=True),
    "prefix_lm": lambda: seqio.PrefixLMFeatureConverter(pack=True),
}


def shard_path(output_dir: str, name: str, index: int, num_shards: int) -> str:
    return os.path.join(output_dir, f"{name}.array_record-{index:05d}-of-{num_shards:05d}")


def packed_dataset(*, task: str, split: str, feature_lengths: Mapping[str, int], converter: str,
                   seed: int | None = 0):
    """The converted (packed) tf.data dataset of a task or mixture, one pass, file order."""
    if converter not in CONVERTERS:
        raise ValueError(f"unknown converter {converter!r}; expected one of {sorted(CONVERTERS)}")
    return seqio.get_dataset(task, task_feature_lengths=dict(feature_lengths), dataset_split=split,
                             shuffle=False, num_epochs=1, seed=seed,
                             feature_converter=CONVERTERS[converter]())


def _vocab_info(task: str) -> dict:
    provider = seqio.get_mixture_or_task(task)
    info = {}
    for key, feature in provider.output_features.items():
        vocab = feature.vocabulary
        info[key] = {"vocab_path": getattr(vocab, "sentencepiece_model_file", None),
                     "vocab_size": vocab.vocab_size, "extra_ids": vocab.extra_ids}
    return info


def export_cache(*, task: str, split: str, output_dir: str, feature_lengths: Mapping[str, int],
                 converter: str = "decoder", num_shards: int = 1, max_examples: int | None = None,
                 seed: int | None = 0, progress: bool = True) -> dict:
    """Writes the shards and metadata.json; returns the metadata.

    `max_examples`: cache only the first `max_examples` packed examples (None: the whole split).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if max_examples is not None and max_examples < 1:  # tf.data's take(-1) would take everything
        raise ValueError(f"max_examples must be >= 1 (None: the whole split), got {max_examples}")
    os.makedirs(output_dir, exist_ok=True)
    meta_path = os.path.join(output_dir, cache_reader.METADATA_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the directory is unfinished until the new metadata lands
    ds = packed_dataset(task=task, split=split, feature_lengths=feature_lengths, converter=converter,
                        seed=seed)
    if max_examples is not None:
        ds = ds.take(max_examples)
    specs = ds.element_spec
    names = sorted(specs)
    lengths = {k: int(specs[k].shape[0]) for k in names}
    if any(lengths[k] <= 0 for k in names):
        raise ValueError(f"feature lengths must be static; got {lengths}")
    base = f"{task}-{split}"
    writers = [ArrayRecordWriter(shard_path(output_dir, base, i, num_shards), "group_size:1")
               for i in range(num_shards)]
    counts = [0] * num_shards
    tokens = {k: 0 for k in names}
    n = 0
    for ex in tqdm.tqdm(ds.as_numpy_iterator(), desc=f"caching {task}/{split}", unit=" ex",
                        total=max_examples, disable=not progress):
        record = np.concatenate([np.asarray(ex[k], dtype=np.int32).reshape(-1) for k in names])
        writers[n % num_shards].write(record.tobytes())
        counts[n % num_shards] += 1
        for k in names:
            if k.endswith("_tokens"):
                tokens[k] += int(np.count_nonzero(ex[k]))
        n += 1
    for w in writers:
        w.close()
    if n == 0:
        raise ValueError(f"{task}/{split} produced no examples to cache")
    meta = {
        "format": cache_reader.FORMAT,
        "task": task, "split": split, "converter": converter, "pack": True,
        "task_feature_lengths": dict(feature_lengths),
        "features": {k: {"dtype": "int32", "length": lengths[k]} for k in names},
        "feature_order": names,
        "non_padding_tokens": {k: v for k, v in tokens.items() if k.endswith("_tokens")},
        "vocabulary": _vocab_info(task),
        "num_examples": n,
        "shards": [{"file": os.path.basename(shard_path(output_dir, base, i, num_shards)),
                    "num_examples": c} for i, c in enumerate(counts)],
        "max_examples": max_examples, "seed": seed,
    }
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    gin_files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="registered seqio task or mixture")
    p.add_argument("--split", default="train")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--feature_lengths", required=True, type=lm.feature_lengths_arg,
                   help="e.g. targets=512 or inputs=512,targets=114")
    p.add_argument("--converter", default="decoder", choices=sorted(CONVERTERS))
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--max_examples", type=int, default=None,
                   help="cache only the first N packed examples (a prefix of the split)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(rest)
    try:  # every input checked before the long export starts
        lm.parse_gin(gin_files, bindings)
        seqio.get_mixture_or_task(args.task)
        os.makedirs(args.output_dir, exist_ok=True)
        if not os.access(args.output_dir, os.W_OK):
            raise PermissionError(f"--output_dir {args.output_dir} is not writable")
    except (gin_cli.GinConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = export_cache(task=args.task, split=args.split, output_dir=args.output_dir,
                        feature_lengths=args.feature_lengths, converter=args.converter,
                        num_shards=args.num_shards, max_examples=args.max_examples, seed=args.seed)
    counts = ", ".join(str(s["num_examples"]) for s in meta["shards"])
    print(f"wrote {meta['num_examples']} packed examples of {args.task}/{args.split} to "
          f"{args.output_dir} ({args.num_shards} shards: {counts}); features "
          f"{ {k: v['length'] for k, v in meta['features'].items()} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
