"""What the two batch backends share: a request's row (prompt, sampling parameters, progress), the
shape buckets that bound compilations, and a sampler taking its parameters per row.

Sampling parameters are arrays [batch] (traced), not compile-time constants, so requests with
different temperature / top-k / top-p / seed share one compiled step. The filters are those of
`models.decoding.filter_logits` (top-k, then the smallest nucleus of mass >= top_p of what is left;
ties at the k-th logit are kept), applied row by row; temperature 0 is argmax, exactly as
`decoding.sample_logits`, so a greedy row decodes what `predict_batch` and `TokenStreamer` decode.
Each row draws from `fold_in(key(seed), t)` for its t-th token: a seeded request samples the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(eq=False)
class Row:
    """One request inside a backend: set by the engine, advanced by the backend."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # decode max_tokens whatever is sampled (benchmarks)
    handle: Any = None     # the engine's request handle
    count: int = 0         # tokens sampled so far
    last: int = 0          # the last sampled token (fed at the next step)
    start: int = 0         # decoder: the first cache slot holding its prompt
    slot: int = -1         # the batch row it occupies

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


class SlotTable:
    """The rows of a batch by slot (None: free); shared by the decoder and T5 backends."""

    slots: list[Row | None]

    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def _free_slot(self, row: Row) -> None:
        if 0 <= row.slot < len(self.slots) and self.slots[row.slot] is row:
            self.slots[row.slot] = None
        row.slot = -1


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that are compiled: 1, 2, 4, ... up to `max_batch` (which is always one)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return tuple(sizes + [max_batch])


def length_buckets(limit: int, *, base: int = 32) -> tuple[int, ...]:
    """Widths that are compiled for prompts (and T5 decode lengths): base, 2·base, 4·base, ...
    while below `limit`, then `limit` rounded up to a multiple of `base`. Padding at most doubles a
    prompt, and a 2048-token context has 7 widths (TokenStreamer's multiples of 32 would be 64)."""
    top = -(-limit // base) * base
    sizes, w = [], base
    while w < top:
        sizes.append(w)
        w *= 2
    return tuple(sizes + [top])


def fit(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def sampling_arrays(rows: Sequence[Row | None], size: int) -> dict[str, np.ndarray]:
    """Per-row parameters [size] for `sample_rows` (absent rows: greedy) and token counters."""
    out = {"temperature": np.zeros(size, np.float32), "top_k": np.zeros(size, np.int32),
           "top_p": np.ones(size, np.float32), "seed": np.zeros(size, np.int32),
           "counter": np.zeros(size, np.int32)}
    for i, r in enumerate(rows):
        if r is not None:
            out["temperature"][i], out["top_k"][i] = r.temperature, r.top_k
            out["top_p"][i] = r.top_p
            out["seed"][i], out["counter"][i] = r.seed % (2 ** 31), r.count
    return out


def sample_rows(logits: Array, *, temperature: Array, top_k: Array, top_p: Array, seed: Array,
                counter: Array) -> Array:
    """One token id per row of fp32 logits [batch, vocab] with that row's parameters.

    The vocabulary sort behind top-k/top-p runs only when some row of the batch filters, and
    sampling only when some row samples (`lax.cond`: all-greedy batches cost an argmax)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0
    filters = sampled & ((top_k > 0) | (top_p < 1.0))

    def sample(_):
        scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
        scaled = jax.lax.cond(jnp.any(filters), _filter, lambda x, *_: x, scaled, top_k, top_p)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, counter)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
        return jnp.where(sampled, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(sampled), sample, lambda _: greedy, None)


def _filter(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """Per-row top-k then top-p (models.decoding.filter_logits' rules; 0 / 1.0 = off)."""
    vocab = scaled.shape[-1]
    neg_inf = jnp.finfo(jnp.float32).min
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=1)
    scaled = jnp.where(scaled < kth, neg_inf, scaled)
    desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, neg_inf)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < threshold, neg_inf, scaled)
