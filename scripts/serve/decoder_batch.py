"""Continuous batching for the decoder: a finished row's slot takes the next waiting request at
the next step, while the other rows keep decoding.

The decoder's KV cache writes every row at one shared slot index (models/decoder.py), and
`kv_mask` [batch, cache_len] says which slots each row may attend to. Keys carry their RoPE
position, not their slot, so a row's tokens may sit anywhere in the cache:

- the batch cache has C = context + margin slots (`margin` defaults to half the context); every
  step writes the fed token of every row at slot `index` and advances it;
- a joining request is prefilled on its own cache rows (several joiners in one call) with its
  prompt, left-padded to a width bucket W, at slots [index - W, index), then copied into its batch
  row (`insert`); its first token comes from that prefill;
- when `index` reaches C, the cache is shifted left by the oldest live row's first slot
  (compaction: a row spans at most `context` slots, so at least `margin` slots come free); when a
  joiner's W exceeds `index`, the cache is shifted right (slots past `index` are always empty).

Positions are the ones `decoding.decode` and `TokenStreamer` use (prompt tokens 0..n-1, token t at
n + t), and masked slots add nothing to the softmax, so a greedy row decodes exactly what
`predict_batch` decodes, whatever shares its batch (up to float summation order).

Compiled shapes: the step and shift per batch bucket (1, 2, 4, ... max_batch: the batch grows
and shrinks with the live rows), the insert per (batch bucket, joiners bucket), the prefill per
(joiners bucket, width bucket). Dense
attention reads all C slots of every row each step: that, not the parameters, bounds the batch on
long contexts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhchat.scripts.serve import rows as rows_lib
from zhchat.scripts.serve.rows import Row


def _with_index(cache: Any, index: jax.Array) -> Any:
    """The cache with every layer's write index set to `index`."""
    def one(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return jnp.asarray(index, x.dtype) if name == "cache_index" else x
    return jax.tree_util.tree_map_with_path(one, cache)


def _rows(x: jax.Array) -> bool:
    return x.ndim > 0  # K/V [batch, slots, heads, dim]; the scalar index is shared


class DecoderBatch(rows_lib.SlotTable):
    """Slots of one continuous batch over a `DecoderOnlyModel` (see the module docstring)."""

    def __init__(self, model: Any, params: Any, *, max_batch: int, context: int,
                 width_base: int = 32, margin: int | None = None):
        self.model, self.max_batch, self.context = model, max_batch, context
        self.batch_sizes = rows_lib.batch_buckets(max_batch)
        self.widths = rows_lib.length_buckets(context, base=width_base)
        margin = max(width_base, context // 2) if margin is None else margin
        # a prefill window must fit below `index`, and compaction must free a slot
        self.slots_total = max(context + max(margin, 1), self.widths[-1])
        self.params = model.decode_params(params)  # scanned layers are split once, not per step
        self.slots: list[Row | None] = []
        self.cache: Any = None
        self.valid: jax.Array | None = None
        self.index = 0
        self.shapes: set[tuple] = set()  # (function, shape...) compiled so far
        self._fns = _jitted(jax.default_backend() != "cpu")

    # ---- the engine's interface --------------------------------------------------------------
    def free_slots(self) -> int:
        return self.max_batch - self.active()

    def release(self, row: Row) -> None:
        """Frees the row's slot (its cache row is overwritten by the next joiner)."""
        self._free_slot(row)

    def admit(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        """Prefills `rows` (at most `free_slots()`) into free slots; their first sampled tokens."""
        if not rows:
            return []
        if len(rows) > self.free_slots():
            raise ValueError(f"{len(rows)} joiners for {self.free_slots()} free slots")
        longest = max(r.prompt_len for r in rows)
        if longest + 1 > self.context or any(r.prompt_len + r.max_tokens > self.context
                                             for r in rows):
            raise ValueError(f"a prompt + max_tokens exceeds the context of {self.context}")
        width = rows_lib.fit(longest, self.widths)
        if not self.active():
            self.index = width  # an idle batch restarts at the front of its cache
        elif self.index < width:
            self._shift_by(self.index - width)
        free = [i for i, r in enumerate(self.slots) if r is None]
        if len(free) < len(rows):
            self._resize(rows_lib.fit(self.active() + len(rows), self.batch_sizes))
            free = [i for i, r in enumerate(self.slots) if r is None]
        k = rows_lib.fit(len(rows), self.batch_sizes)
        tokens = np.zeros((k, width), np.int32)
        mask = np.zeros((k, width), bool)
        mask[:, -1] = True  # padding rows attend to one slot (their output is dropped)
        targets = np.full((k,), len(self.slots), np.int32)  # out of range: dropped by insert
        for j, r in enumerate(rows):
            tokens[j, width - r.prompt_len:] = r.prompt
            mask[j, width - r.prompt_len:] = True
            r.slot, r.start, r.count = free[j], self.index - r.prompt_len, 0
            targets[j] = r.slot
            self.slots[r.slot] = r
        samp = rows_lib.sampling_arrays(list(rows), k)
        self.shapes.add(("prefill", k, width))
        first, row_cache, row_valid = self._fns["prefill"](
            self.model, self.slots_total, self.params, tokens, mask, np.int32(self.index - width),
            samp)
        self.shapes.add(("insert", len(self.slots), k))
        self.cache, self.valid = self._fns["insert"](self.cache, self.valid, row_cache,
                                                     row_valid, targets)
        first = np.asarray(first)
        return [(r, int(first[j])) for j, r in enumerate(rows)]

    def step(self) -> list[tuple[Row, int]]:
        """One token for every live row (writing each row's last token first)."""
        live = [r for r in self.slots if r is not None]
        if not live:
            return []
        self._maybe_shrink()
        if self.index >= self.slots_total:
            self._shift_by(min(r.start for r in live))
        b = len(self.slots)
        tokens, positions = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for r in live:
            tokens[r.slot], positions[r.slot] = r.last, r.prompt_len + r.count - 1
        self.shapes.add(("step", b))
        out, self.cache, self.valid = self._fns["step"](
            self.model, self.params, self.cache, self.valid, tokens, positions,
            np.int32(self.index), rows_lib.sampling_arrays(self.slots, b))
        self.index += 1
        out = np.asarray(out)
        return [(r, int(out[r.slot])) for r in live]

    def precompile(self, widths: Sequence[int] | None = None) -> None:
        """Compiles, on dummy inputs, the prefill of every joiners bucket at `widths` (default:
        every width bucket), and every batch bucket's step, shift and inserts. The batch itself
        is untouched."""
        f, C, none = self._fns, self.slots_total, rows_lib.sampling_arrays
        prefilled = {}
        for k in self.batch_sizes:
            for w in widths or self.widths:
                mask = np.zeros((k, w), bool)
                mask[:, -1] = True
                prefilled[k] = f["prefill"](self.model, C, self.params, np.zeros((k, w), np.int32),
                                            mask, np.int32(0), none([], k))[1:]
                self.shapes.add(("prefill", k, w))
        for b in self.batch_sizes:
            cache, valid, zeros = self.model.init_cache(b, C), jnp.zeros((b, C), bool), np.zeros(
                b, np.int32)
            _, cache, valid = f["step"](self.model, self.params, cache, valid, zeros, zeros,
                                        np.int32(0), none([], b))
            cache, valid = f["shift"](cache, valid, np.int32(1))
            for k in [k for k in self.batch_sizes if k <= b]:
                cache, valid = f["insert"](cache, valid, *prefilled[k], np.full(k, b, np.int32))
                self.shapes.add(("insert", b, k))
            jax.block_until_ready(valid)
            self.shapes.update({("step", b), ("shift", b)})

    # ---- host-side bookkeeping ---------------------------------------------------------------
    def _shift_by(self, offset: int) -> None:
        """Cache slot j takes slot j + offset (left for offset > 0, right for < 0)."""
        if offset == 0:
            return
        self.shapes.add(("shift", len(self.slots)))
        self.cache, self.valid = self._fns["shift"](self.cache, self.valid, np.int32(offset))
        self.index -= offset
        for r in self.slots:
            if r is not None:
                r.start -= offset

    def _resize(self, size: int) -> None:
        """Grows (zero rows) or shrinks (drops empty trailing rows) the batch to `size` rows."""
        if self.cache is None:
            self.cache = self.model.init_cache(size, self.slots_total)
            self.valid = jnp.zeros((size, self.slots_total), bool)
        else:
            old = len(self.slots)
            def resize(x):
                if not _rows(x):
                    return x
                if size < old:
                    return x[:size]
                return jnp.concatenate([x, jnp.zeros((size - old,) + x.shape[1:], x.dtype)])
            self.cache = jax.tree.map(resize, self.cache)
            self.valid = resize(self.valid)
        self.slots = (self.slots + [None] * size)[:size]

    def _maybe_shrink(self) -> None:
        """Halves (or more) the batch when its upper rows are all free."""
        used = max((i for i, r in enumerate(self.slots) if r is not None), default=-1) + 1
        size = rows_lib.fit(max(used, 1), self.batch_sizes)
        if size <= len(self.slots) // 2:
            self._resize(size)



# ---- jitted device functions (module level: engines over one model share their compilations) --
def _apply(model, params, cache, tokens, positions, kv_mask):
    logits, mutated = model.decode_module.apply(
        {"params": params, "cache": cache}, tokens, positions=positions, kv_mask=kv_mask,
        decode=True, mutable=["cache"])
    return logits.astype(jnp.float32), mutated["cache"]


def _prefill(model, slots_total, params, tokens, mask, start, samp):
    """Joiners' prompts at slots [start, start + width) of fresh cache rows; first tokens."""
    k = tokens.shape[0]
    cache = _with_index(model.init_cache(k, slots_total), start)
    kv = jax.lax.dynamic_update_slice(jnp.zeros((k, slots_total), bool), mask, (0, start))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = _apply(model, params, cache, tokens, positions, kv)
    return rows_lib.sample_rows(logits[:, -1], **samp), cache, kv


def _insert(cache, valid, row_cache, row_valid, targets):
    """Batch rows `targets` take the prefilled rows (out-of-range targets are dropped)."""
    put = lambda big, small: big.at[targets].set(small, mode="drop") if _rows(big) else big
    return jax.tree.map(put, cache, row_cache), put(valid, row_valid)


def _step(model, params, cache, valid, tokens, positions, index, samp):
    """Writes each row's last token at slot `index` and samples the next."""
    valid = valid.at[:, index].set(True)
    logits, cache = _apply(model, params, _with_index(cache, index), tokens[:, None],
                           positions[:, None], valid)
    return rows_lib.sample_rows(logits[:, -1], **samp), cache, valid


def _shift(cache, valid, offset):
    """Slot j takes slot j + offset; slots whose source is outside the cache become invalid."""
    roll = lambda x: jnp.roll(x, -offset, axis=1) if _rows(x) else x
    source = jnp.arange(valid.shape[1]) + offset
    inside = (source >= 0) & (source < valid.shape[1])
    return jax.tree.map(roll, cache), roll(valid) & inside[None, :]


@functools.cache
def _jitted(donate: bool) -> dict[str, Callable]:
    """The jitted functions; with `donate` (not on CPU) the batch cache is updated in place."""
    d = lambda *argnums: argnums if donate else ()
    return {"prefill": jax.jit(_prefill, static_argnums=(0, 1)),
            "insert": jax.jit(_insert, donate_argnums=d(0, 1)),
            "step": jax.jit(_step, static_argnums=(0,), donate_argnums=d(2, 3)),
            "shift": jax.jit(_shift, donate_argnums=d(0, 1))}
