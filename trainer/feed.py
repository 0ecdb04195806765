"""Feeding the train loop: this process's input iterator, global device batches placed one step
ahead of the device, and the loss evaluation over a fixed number of eval batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from zhchat.trainer import partitioning


def make_iterator(source: Any, *, batch_size: int, seed: int) -> Iterator:
    """An iterator of this process's batches: `source` is an iterator, an iterable, or a factory
    called with (batch_size, seed, shard_index, shard_count) for this process's input shard."""
    if source is None:
        raise ValueError("train.train_data is not set (bind e.g. @train/make_cache_iterator)")
    if hasattr(source, "__next__"):
        return source
    if callable(source):
        return source(batch_size=batch_size, seed=seed, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
    return iter(source)


def peek(it: Iterator) -> tuple[Mapping[str, np.ndarray], Iterator]:
    """(the first batch, an iterator that still yields it): rewinds iterators with a saved state
    (grain, the cache reader), chains the batch in front of plain ones."""
    if hasattr(it, "get_state"):
        start = it.get_state()
        first = next(it)
        it.set_state(start)
        return first, it
    first = next(it)

    def chained():
        yield first
        yield from it
    return first, chained()


class DevicePrefetcher:
    """Yields (global device batch, iterator state after it). Call `prefetch()` right after
    dispatching a step: the next batch is then read and placed while the device computes."""

    def __init__(self, it: Iterator, sharding: jax.sharding.Sharding, *, global_batch: int):
        self.it, self.sharding, self.global_batch = it, sharding, global_batch
        self._next: tuple[dict[str, jax.Array], Any] | None = None
        self._exhausted = False

    def _fetch(self) -> tuple[dict[str, jax.Array], Any] | None:
        try:
            local = next(self.it)
        except StopIteration:
            self._exhausted = True
            return None
        batch = {}
        for name, x in local.items():
            x = np.asarray(x)
            global_shape = (self.global_batch,) + x.shape[1:]
            batch[name] = jax.make_array_from_process_local_data(self.sharding, x, global_shape)
        return batch, (self.it.get_state() if hasattr(self.it, "get_state") else None)

    def prefetch(self) -> None:
        if self._next is None and not self._exhausted:
            self._next = self._fetch()

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[dict[str, jax.Array], Any]:
        self.prefetch()
        if self._next is None:
            raise StopIteration
        current, self._next = self._next, None
        return current


class EvalRunner:
    """Evaluates `steps` batches of the eval stream, rewound to its start each time if possible."""

    def __init__(self, source: Any, eval_fn: Callable, partitioner: partitioning.Partitioner, *,
                 batch_size: int, local_batch: int, seed: int, steps: int):
        self.enabled = source is not None
        if not self.enabled:
            return
        self.it = make_iterator(source, batch_size=local_batch, seed=seed)
        self.start = self.it.get_state() if hasattr(self.it, "get_state") else None
        self.eval_fn, self.partitioner, self.batch_size, self.steps = (
            eval_fn, partitioner, batch_size, steps)

    def __call__(self, params: Any) -> dict[str, float]:
        """Token-weighted means of the eval metrics (`num_*` counts are summed)."""
        if self.start is not None:
            self.it.set_state(self.start)
        fetched = DevicePrefetcher(self.it, self.partitioner.batch_sharding,
                                   global_batch=self.batch_size)
        parts = []
        for _ in range(self.steps):
            batch, _ = next(fetched)
            parts.append(self.eval_fn(params, batch))
        host = jax.device_get(parts)
        counts = np.array([float(m.get("num_tokens", 1.0)) for m in host])
        total = max(counts.sum(), 1.0)
        return {k: float(sum(np.asarray(m[k], np.float64) for m in host)) if k.startswith("num_")
                else float(sum(float(m[k]) * c for m, c in zip(host, counts)) / total)
                for k in host[0]}
