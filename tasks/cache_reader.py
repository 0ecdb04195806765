"""TF-free reader of a packed-example cache (`zhchat.tasks.cache`): Grain over ArrayRecord shards.

Order: the global example list is shuffled with `seed` (reshuffled each epoch), repeated, and host
`shard_index` takes every `shard_count`-th example, so all hosts see disjoint parts of every epoch;
with finite epochs the tail is trimmed to a multiple of `shard_count` so hosts run the same number of
steps. The iterator yields dicts of int32 numpy arrays `[batch, length]` with seqio model-feature
names and has `get_state()` / `set_state()` (JSON-serializable, Grain's own position plus the reader
settings it is valid for), so a checkpoint resumes at the exact next batch.

Imports only grain, array_record (through grain) and numpy; jax only when sharding by process.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import gin
import grain
import numpy as np

METADATA_FILE = "metadata.json"
FORMAT = "zhchat.packed_int32.v1"


def cache_metadata(cache_dir: str) -> dict:
    """metadata.json of a finished cache directory (clear error when absent or of another format)."""
    path = os.path.join(cache_dir, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {cache_dir!r} is not a finished cache "
                                "(export it with `python -m zhchat.tasks.cache`)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: cache format {meta.get('format')!r}, this reader reads {FORMAT!r}")
    return meta


class _Decode(grain.transforms.Map):
    """Record bytes -> {feature: int32 array} by the offsets in the metadata."""

    def __init__(self, meta: Mapping[str, Any]):
        self._names = list(meta["feature_order"])
        self._offsets = np.cumsum([0] + [meta["features"][k]["length"] for k in self._names])

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        flat = np.frombuffer(record, dtype=np.int32)
        if flat.size != self._offsets[-1]:
            raise ValueError(f"cache record of {flat.size} int32, expected {self._offsets[-1]}")
        return {k: flat[self._offsets[i]:self._offsets[i + 1]]
                for i, k in enumerate(self._names)}


class CacheIterator:
    """Iterator of batches with a checkpointable position."""

    def __init__(self, dataset: grain.IterDataset, settings: dict):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.settings = settings

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return {"grain": self._iter.get_state(), "settings": self.settings}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = dict(state["settings"])
        if saved != self.settings:
            diff = {k: (saved.get(k), self.settings.get(k))
                    for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k)}
            raise ValueError(f"data iterator state was saved with other reader settings "
                             f"(saved, current): {diff}")
        self._iter.set_state(state["grain"])


@gin.configurable
def make_cache_iterator(*, cache_dir: str = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                        seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                        shard_index: int | None = None, shard_count: int | None = None,
                        drop_remainder: bool = True, num_threads: int = 16,
                        prefetch_buffer_size: int = 256) -> CacheIterator:
    """Batches of the cache in `cache_dir` for this host; see the module docstring for the order."""
    meta = cache_metadata(cache_dir)
    if shard_index is None or shard_count is None:
        import jax  # only to learn this host's place; the reader itself needs no jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [os.path.join(cache_dir, s["file"]) for s in meta["shards"] if s["num_examples"] > 0]
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != meta["num_examples"]:
        raise ValueError(f"{cache_dir}: shards hold {len(source)} records, metadata says "
                         f"{meta['num_examples']}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[:len(ds) - len(ds) % shard_count]
    ds = ds[shard_index::shard_count]
    if num_epochs is not None and len(ds) < batch_size and drop_remainder:
        raise ValueError(f"{cache_dir}: shard {shard_index}/{shard_count} has {len(ds)} examples "
                         f"for {num_epochs} epoch(s), fewer than one batch of {batch_size}")
    ds = ds.map(_Decode(meta)).batch(batch_size, drop_remainder=drop_remainder)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch_buffer_size))
    settings = {"task": meta["task"], "split": meta["split"], "num_examples": meta["num_examples"],
                "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
                "num_epochs": num_epochs, "shard_index": shard_index, "shard_count": shard_count,
                "drop_remainder": drop_remainder}
    return CacheIterator(iter_ds, settings)
