"""Causal self-attention over packed rows (several documents a row, seqio segment ids).

A packed row holds documents 1, 2, ... back to back, then padding (segment id 0); a token sees the
earlier tokens of its own document only. `packed_causal_attention` picks, at run time, one of:

- every row one document + padding -> plain causal flash attention (no mask at all);
- every row at most `max_segments` documents, on a Hopper GPU -> cuDNN flash attention in its
  packed ("THD") layout: each document's start offset and length go to the kernel, which skips the
  blocks across documents, so no [len, len] mask is built or read (forward and backward);
- otherwise (more documents than `max_segments`; XLA on CPU/TPU) -> a boolean [batch, 1, len, len]
  mask from the segment ids.

The choice is a `lax.switch` on facts of the batch computed once per forward (`SegmentInfo`), so
one compiled step serves every batch. Outputs on padding positions are zero on the packed path and
unspecified elsewhere (they carry no loss).

Segments are runs of one nonzero id, as seqio's packing writes them; an id that comes back after
another (1 1 2 2 1) is a new document here, while the dense mask would join the two runs.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zhchat.models import layers

Array = jax.Array


class SegmentInfo(NamedTuple):
    """Facts about a batch's segment ids, shared by every layer of one forward."""

    unpacked: Array   # scalar bool: every row is one segment followed only by padding
    fits: Array       # scalar bool: no row has more than max_segments segments
    lengths: Array    # [batch, max_segments] int32 segment lengths, -1 past a row's last segment
    offsets: Array    # [batch, max_segments + 1] int32 segment starts, -1 past the last one


def segment_info(segment_ids: Array, max_segments: int) -> SegmentInfo:
    """Lengths and start offsets of each row's segments (runs of one nonzero id), in the layout
    of cuDNN's packed attention: [b, M] lengths and [b, M + 1] offsets, -1 where a row has fewer
    than M segments."""
    if max_segments < 2:
        raise ValueError(f"max_segments must be >= 2 (1 is the unpacked layout), got {max_segments}")
    seg = segment_ids.astype(jnp.int32)
    b, t = seg.shape
    valid = seg != 0
    previous = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), seg[:, :-1]], axis=1)
    start = valid & (seg != previous)
    rank = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1  # segment index of each token
    count = jnp.sum(start, axis=1, dtype=jnp.int32)
    rows = jnp.arange(b)[:, None]
    start_slot = jnp.where(start & (rank < max_segments), rank, max_segments + 1)  # else dropped
    offsets = jnp.full((b, max_segments + 1), -1, jnp.int32).at[rows, start_slot].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    token_slot = jnp.where(valid, rank, max_segments)
    lengths = jnp.zeros((b, max_segments), jnp.int32).at[rows, token_slot].add(1, mode="drop")
    lengths = jnp.where(jnp.arange(max_segments)[None, :] < count[:, None], lengths, -1)
    return SegmentInfo(unpacked=layers.unpacked_rows(seg), fits=jnp.all(count <= max_segments),
                       lengths=lengths, offsets=offsets)


@functools.lru_cache(maxsize=None)
def cudnn_packed_available() -> bool:
    """cuDNN's packed layout runs on Hopper or later through jax's cuDNN attention module."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus or not hasattr(fa, "dot_product_attention"):
            return False
        return fa.check_compute_capability("9.0")
    except (ImportError, RuntimeError, AttributeError) as e:
        logging.warning("cuDNN packed attention unavailable: %s", e)
        return False


def _cudnn_packed(q: Array, k: Array, v: Array, info: SegmentInfo, segment_ids: Array,
                  scale: float) -> Array:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    dtype = q.dtype
    out = fa.dot_product_attention(
        q, k.astype(dtype), v.astype(dtype), None, None, info.lengths, info.lengths, info.offsets,
        info.offsets, scale=scale, mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def packed_causal_attention(q: Array, k: Array, v: Array, *, segment_ids: Array,
                            info: SegmentInfo | None = None, implementation: str = "auto",
                            max_segments: int = 64) -> Array:
    """Causal attention of q [b, t, n, h] over k/v [b, t, kv, h] within each row's segments."""
    impl = layers.resolve_attention_impl(implementation, q.dtype, q.shape[-1])
    if info is None:
        info = segment_info(segment_ids, max_segments)
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    causal = lambda: layers.dot_product_attention(q, k, v, is_causal=True,
                                                  implementation=implementation)
    masked = lambda: layers.dot_product_attention(
        q, k, v, mask=layers.make_attention_mask(segment_ids, segment_ids, causal=True),
        implementation=implementation)
    if impl == "cudnn" and cudnn_packed_available():
        packed = lambda: _cudnn_packed(q, k, v, info, segment_ids, scale)
        branch = jnp.where(info.unpacked, 0, jnp.where(info.fits, 1, 2))
        try:
            return jax.lax.switch(branch, (causal, packed, masked))
        except (NotImplementedError, ValueError) as e:  # shapes cuDNN's packed layout rejects
            layers.warn_once(f"cuDNN packed attention rejected {q.shape} q / {k.shape} kv: {e}; "
                             "packed rows use a dense mask")
    return jax.lax.cond(info.unpacked, causal, masked)
