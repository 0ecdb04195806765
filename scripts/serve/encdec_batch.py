"""Static batches for the T5 (encoder-decoder): the waiting requests (up to `max_batch`) are
encoded together and decoded step by step until every row has stopped; requests arriving
meanwhile wait for the next batch.

Not continuous: the T5 decoder's self-attention cache has one position for the whole batch and
its causal mask and relative-position bias follow that position (models/t5.py), with no per-row
mask, so a row cannot join a batch mid-way without a model change. Each row still stops on its
own (its slot just idles until the batch ends) and takes its own sampling parameters.

Compiled shapes: (batch bucket 1, 2, 4, ... max_batch) x (encoder width bucket: 32, 64, ...,
context) x (decode length bucket, the same widths over the batch's largest max_tokens), for the
start (encoder, cache, first token) and for the step. A greedy row equals `predict_batch`: the
same encoder input (prompt + EOS, right-padded), BOS start and cached steps.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhchat.models.t5 import T5
from zhchat.scripts.serve import rows as rows_lib
from zhchat.scripts.serve.rows import Row


class EncDecBatch(rows_lib.SlotTable):
    """One static batch at a time over an `EncoderDecoderModel`."""

    def __init__(self, model: Any, params: Any, *, max_batch: int, context: int,
                 width_base: int = 32):
        self.model, self.max_batch, self.context = model, max_batch, context
        self.batch_sizes = rows_lib.batch_buckets(max_batch)
        self.widths = rows_lib.length_buckets(context, base=width_base)
        self.params = model.decode_params(params)  # unrolled stacks, split once
        self.slots: list[Row | None] = []
        self.cache: Any = None
        self.segments: jax.Array | None = None
        self.length = 0  # the decode cache's positions
        self.shapes: set[tuple] = set()
        self._fns = _jitted(jax.default_backend() != "cpu")

    def free_slots(self) -> int:
        return 0 if self.active() else self.max_batch

    def release(self, row: Row) -> None:
        self._free_slot(row)
        if not self.active():
            self.cache = self.segments = None  # the batch is over

    def admit(self, rows: Sequence[Row]) -> list[tuple[Row, int]]:
        """Starts a batch of `rows` (the backend must be idle); their first sampled tokens."""
        if not rows:
            return []
        if self.active() or len(rows) > self.max_batch:
            raise ValueError(f"a T5 batch starts idle with <= {self.max_batch} rows")
        if any(r.prompt_len + r.max_tokens > self.context for r in rows):
            raise ValueError(f"a prompt + max_tokens exceeds the context of {self.context}")
        k = rows_lib.fit(len(rows), self.batch_sizes)
        width = rows_lib.fit(max(r.prompt_len for r in rows), self.widths)
        self.length = rows_lib.fit(max(r.max_tokens for r in rows), self.widths)
        tokens = np.zeros((k, width), np.int32)
        tokens[:, 0] = self.model.eos_id  # padding rows: an empty input
        for j, r in enumerate(rows):
            tokens[j, :] = 0
            tokens[j, :r.prompt_len] = r.prompt
            r.slot, r.count = j, 0
        self.slots = list(rows) + [None] * (k - len(rows))
        self.shapes.add(("start", k, width, self.length))
        first, self.cache, self.segments = self._fns["start"](
            self.model, self.length, self.params, tokens, rows_lib.sampling_arrays(self.slots, k))
        first = np.asarray(first)
        return [(r, int(first[r.slot])) for r in rows]

    def step(self) -> list[tuple[Row, int]]:
        live = [r for r in self.slots if r is not None]
        if not live:
            return []
        k = len(self.slots)
        tokens = np.zeros(k, np.int32)
        for r in live:
            tokens[r.slot] = r.last
        self.shapes.add(("step", k, self.segments.shape[1], self.length))
        out, self.cache = self._fns["step"](self.model, self.length, self.params, self.cache,
                                            self.segments, tokens,
                                            rows_lib.sampling_arrays(self.slots, k))
        out = np.asarray(out)
        return [(r, int(out[r.slot])) for r in live]

    def precompile(self, widths: Sequence[int] | None = None,
                   lengths: Sequence[int] | None = None) -> None:
        """Compiles the start and step of every batch bucket for encoder `widths` x decode
        `lengths` (default: every width bucket, decode length 32), on dummy inputs."""
        for k in self.batch_sizes:
            for w in widths or self.widths:
                for length in lengths or self.widths[:1]:
                    tokens = np.zeros((k, w), np.int32)
                    tokens[:, 0] = self.model.eos_id
                    samp = rows_lib.sampling_arrays([], k)
                    _, cache, segments = self._fns["start"](self.model, length, self.params,
                                                            tokens, samp)
                    out, _ = self._fns["step"](self.model, length, self.params, cache, segments,
                                               np.zeros(k, np.int32), samp)
                    jax.block_until_ready(out)
                    self.shapes.update({("start", k, w, length), ("step", k, w, length)})


# ---- jitted device functions (module level: engines over one model share their compilations) --
def _decode(model, length, params, cache, encoded, segments, tokens):
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, mutated = model.decode_module.apply(
        variables, encoded, segments, tokens, decode=True, max_decode_length=length,
        method=T5.decode, mutable=["cache"])
    return logits[:, -1], mutated["cache"]


def _start(model, length, params, tokens, samp):
    """Encodes the batch, builds its cache of `length` positions, samples the first tokens."""
    segments = (tokens != model.pad_id).astype(jnp.int32)
    encoded = model.decode_module.apply({"params": params}, tokens, method=T5.encode)
    bos = jnp.zeros((tokens.shape[0], 1), jnp.int32)  # T5 starts the decoder from id 0
    _, cache = _decode(model, length, params, None, encoded, segments, bos)  # allocates
    logits, cache = _decode(model, length, params, cache, None, segments, bos)
    return rows_lib.sample_rows(logits, **samp), cache, segments


def _advance(model, length, params, cache, segments, tokens, samp):
    logits, cache = _decode(model, length, params, cache, None, segments, tokens[:, None])
    return rows_lib.sample_rows(logits, **samp), cache


@functools.cache
def _jitted(donate: bool) -> dict[str, Callable]:
    return {"start": jax.jit(_start, static_argnums=(0, 1)),
            "step": jax.jit(_advance, static_argnums=(0, 1),
                            donate_argnums=(3,) if donate else ())}
