"""Encoder-decoder cross-attention over packed rows through cuDNN's packed layout.

A packed T5 row holds examples 1, 2, ... in both the encoder row (their inputs) and the decoder
row (their targets); decoder segment j attends to encoder segment j only. On a Hopper GPU that is
cuDNN's packed ("THD") layout with separate query and key tables: document j of the decoder's
segment table (models/attention.py's `segment_info`) pairs with document j of the encoder's, so no
[batch, 1, dec_len, enc_len] mask is built and folded into a bias. The pairing holds when in every
row both sides number their segments 1, 2, ... in order (seqio's packing) and hold the same count
(an example with empty targets breaks it); such batches, overflowing tables and other backends take
the dense mask, chosen at run time by a `lax.cond`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zhchat.models import attention, layers

Array = jax.Array


class CrossInfo(NamedTuple):
    """Facts about a packed batch's query (decoder) and key (encoder) segments."""

    queries: attention.SegmentInfo
    keys: attention.SegmentInfo
    paired: Array    # scalar bool: query segment j of every row goes with key segment j


def _numbered(segment_ids: Array) -> tuple[Array, Array]:
    """(every token's id is its run's number 1, 2, ... in its row, [batch] run counts)."""
    seg = segment_ids.astype(jnp.int32)
    run = jnp.cumsum(attention.segment_starts(seg), axis=1, dtype=jnp.int32)
    return jnp.all((seg == 0) | (seg == run)), run[:, -1]


def segments_paired(query_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """True (scalar) when both sides number their segments 1, 2, ... with equal counts a row."""
    q_ok, q_count = _numbered(query_segment_ids)
    kv_ok, kv_count = _numbered(kv_segment_ids)
    return q_ok & kv_ok & jnp.all(q_count == kv_count)


def cross_info(query_segment_ids: Array, kv_segment_ids: Array, max_segments: int, *,
               groups: int = 1) -> CrossInfo:
    return CrossInfo(
        queries=attention.segment_info(query_segment_ids, max_segments, groups=groups),
        keys=attention.segment_info(kv_segment_ids, max_segments, groups=groups),
        paired=segments_paired(query_segment_ids, kv_segment_ids))


def packed_cross_attention(q: Array, k: Array, v: Array, *, query_segment_ids: Array,
                           kv_segment_ids: Array, info: CrossInfo | None = None,
                           implementation: str = "auto", max_segments: int = 16,
                           scale: float | None = None) -> Array:
    """Attention of q [b, t, n, h] over k/v [b, s, n, h] where segment ids match: what
    `layers.make_attention_mask(query_segment_ids, kv_segment_ids)` gives. Outputs on query
    padding are unspecified (zero on the packed path)."""
    def masked(q, k, v, q_seg, kv_seg):
        return layers.dot_product_attention(q, k, v, mask=layers.make_attention_mask(q_seg, kv_seg),
                                            implementation=implementation, scale=scale)
    ids = (query_segment_ids, kv_segment_ids)
    if not attention.uses_packed_kernel(implementation, q.dtype, q.shape[-1]):
        return masked(q, k, v, *ids)
    if info is None:
        info = cross_info(query_segment_ids, kv_segment_ids, max_segments,
                          groups=attention.batch_groups(q.shape[0]))
    s = 1.0 / float(q.shape[-1]) ** 0.5 if scale is None else scale
    packed = lambda: attention.cudnn_packed_kernel(q, k, v, info.queries, info.keys,
                                               query_segment_ids, kv_segment_ids, s, False)
    # the fallback is rematerialised: a cond's backward keeps every branch's residuals
    fallback = lambda: jax.checkpoint(masked)(q, k, v, *ids)
    try:
        return jax.lax.cond(info.paired & info.queries.fits & info.keys.fits, packed, fallback)
    except (NotImplementedError, ValueError) as e:  # shapes cuDNN's packed layout rejects
        layers.warn_once(f"cuDNN packed cross-attention rejected {q.shape} q / {k.shape} kv: "
                         f"{e}; packed rows use a dense mask")
    return masked(q, k, v, *ids)
