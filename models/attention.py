"""Self-attention over packed rows (several documents a row, seqio segment ids).

A packed row holds documents 1, 2, ... back to back, then padding (segment id 0); a token sees the
earlier tokens of its own document only (`packed_causal_attention`), or with `causal=False` every
token of it (`packed_attention`; prefix-LM rows use both, models/prefix_attention.py). Either picks,
at run time, one of:

- every row one document + padding -> plain flash attention (causal: no mask at all;
  bidirectional: the row's length);
- the batch's documents fit the segment table (below), on a Hopper GPU -> cuDNN flash attention in
  its packed ("THD") layout: each document's start and length go to the kernel, which skips the
  blocks across documents, so no [len, len] mask is built or read (forward and backward);
- on TPU (or `attention_impl="splash"`) -> splash attention with the segment ids (models/splash.py);
- otherwise (XLA on CPU too) -> a boolean [batch, 1, len, len] mask from the segment ids.

The choice is a `lax.switch` on facts of the batch computed once per forward (`SegmentInfo`), so
one compiled step serves every batch. Outputs on padding positions are zero on the packed path and
unspecified elsewhere (they carry no loss).

The segment table. cuDNN takes [batch, M] lengths and [batch, M + 1] offsets; jax flattens them
into one list of up to batch * M documents (offsets of table row r count from token r * len), and
cuDNN keeps softmax statistics of [batch * M, heads, len] floats, so M (`max_segments`) costs
memory and backward time linearly and must stay small. Real caches have a long tail (a few rows of
60+ short documents, most rows 1-3), so documents are not tied to their own table row: the k-th
document of the batch goes to table row k // M, which holds any document starting at or after
token (k // M) * len. That fits when every prefix of rows holds at most M documents per row; the
decoder sorts rows by document count (within each data-parallel shard, see `sort_rows`) so that
it almost always does. Segments are runs of one nonzero id, as seqio's packing writes them.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from zhchat.models import layers, splash

Array = jax.Array


class SegmentInfo(NamedTuple):
    """Facts about a batch's segment ids, shared by every layer of one forward."""

    unpacked: Array   # scalar bool: every row is one segment followed only by padding
    fits: Array       # scalar bool: the documents fit the segment table
    lengths: Array    # [batch, M] int32 document lengths, -1 on unused slots
    offsets: Array    # [batch, M + 1] int32 document starts, from token row * len; -1 unused


def segment_starts(segment_ids: Array) -> Array:
    """[batch, len] True where a segment (a run of one nonzero id) begins."""
    seg = segment_ids.astype(jnp.int32)
    previous = jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
    return (seg != 0) & (seg != previous)


def documents_per_row(segment_ids: Array) -> Array:
    """[batch] number of segments (runs of one nonzero id) in each row."""
    return jnp.sum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def segment_info(segment_ids: Array, max_segments: int, *, groups: int = 1) -> SegmentInfo:
    """The segment table of `segment_ids` [batch, len] for cuDNN's packed layout.

    `groups` splits the batch into that many consecutive blocks of rows laid out apart (one per
    data-parallel shard: the kernel runs per shard on its local rows). Built from comparisons and
    one row gather, no scatters (scatter-adds of every token into a few slots serialise on GPU).
    """
    if max_segments < 2:
        raise ValueError(f"max_segments must be >= 2 (1 is the unpacked layout), got {max_segments}")
    b, t = segment_ids.shape
    if b % groups:
        raise ValueError(f"batch {b} does not split into {groups} groups")
    m, rows = max_segments, b // groups
    valid = segment_ids != 0
    c = jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)  # starts at or before each token
    count = c[:, -1].reshape(groups, rows)
    end = jnp.cumsum(count, axis=1)                                # [g, rows] past each row's docs
    fits = jnp.all(end <= (jnp.arange(1, rows + 1) * m)[None, :])
    slot = jnp.arange(rows * m, dtype=jnp.int32).reshape(rows, m)  # k-th document of the group
    row = jnp.sum(end[:, None, None, :] <= slot[None, :, :, None], axis=-1, dtype=jnp.int32)
    used = slot[None] < end[:, -1:, None]                          # [g, rows, m]
    row = jnp.minimum(row, rows - 1)
    first = jnp.take_along_axis(end - count, row.reshape(groups, -1), axis=1).reshape(row.shape)
    k = slot[None] - first                                         # index within its row
    source = row + (jnp.arange(groups) * rows)[:, None, None]      # its row in the batch
    c_rows, valid_rows = c[source], valid[source]                  # [g, rows, m, len]
    start = jnp.sum(c_rows <= k[..., None], axis=-1, dtype=jnp.int32)
    length = jnp.sum((c_rows == k[..., None] + 1) & valid_rows, axis=-1, dtype=jnp.int32)
    offset = (row - jnp.arange(rows)[None, :, None]) * t + start
    lengths = jnp.where(used, length, -1).reshape(b, m)
    offsets = jnp.where(used, offset, -1).reshape(b, m)
    offsets = jnp.concatenate([offsets, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return SegmentInfo(unpacked=layers.unpacked_rows(segment_ids), fits=fits, lengths=lengths,
                       offsets=offsets)


def batch_groups(batch: int) -> int:
    """Data-parallel shards of the batch under the active mesh and logical rules (1 without)."""
    try:
        axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
        mesh = jax.sharding.get_abstract_mesh()
    except (ValueError, RuntimeError, AttributeError):
        return 1
    if axes is None or mesh is None or getattr(mesh, "empty", True):
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(dict(mesh.shape).get(a, 1) for a in axes)
    return n if n > 0 and batch % n == 0 else 1


def sort_rows(segment_ids: Array, groups: int) -> Array:
    """[groups, batch // groups] orders putting each group's rows (consecutive rows: one
    data-parallel shard) in ascending document count; rows never leave their group. Stable."""
    b = segment_ids.shape[0]
    docs = documents_per_row(segment_ids).reshape(groups, b // groups)
    return jnp.argsort(docs, axis=1, stable=True).astype(jnp.int32)


def permute_rows(x: Array, order: Array) -> Array:
    """x [batch, ...] with each group's rows taken in `order` [groups, rows] (a local gather)."""
    g, rows = order.shape
    grouped = x.reshape((g, rows) + x.shape[1:])
    return jax.vmap(lambda xs, o: xs[o])(grouped, order).reshape(x.shape)


def inverse_order(order: Array) -> Array:
    """The orders that undo `order` (per group)."""
    return jnp.argsort(order, axis=1).astype(jnp.int32)


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


def uses_packed_kernel(implementation: str, dtype, head_dim: int) -> bool:
    """Whether packed rows of this config go to cuDNN's packed kernel (else the dense mask)."""
    return (layers.resolve_attention_impl(implementation, dtype, head_dim) == "cudnn"
            and cudnn_packed_available())


def cudnn_packed_kernel(q: Array, k: Array, v: Array, q_info: SegmentInfo,
                        kv_info: SegmentInfo, q_segment_ids: Array, kv_segment_ids: Array,
                        scale: float, causal: bool) -> Array:
    """cuDNN's packed layout: query document j of the table attends to key document j."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    dtype = q.dtype
    q_valid = (q_segment_ids != 0)[:, :, None, None]
    kv_valid = (kv_segment_ids != 0)[:, :, None, None]
    # padding tokens lie outside every document: the kernel leaves their outputs and gradients
    # unwritten, so both are zeroed here (the inputs' where masks the gradients)
    zero = jnp.zeros((), dtype)
    q = jnp.where(q_valid, q.astype(dtype), zero)
    k, v = (jnp.where(kv_valid, x.astype(dtype), zero) for x in (k, v))
    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out = fa.dot_product_attention(
        q, k, v, None, None, q_info.lengths, kv_info.lengths, q_info.offsets, kv_info.offsets,
        scale=scale, mask_type=mask_type, qkv_layout="BTNH")
    return jnp.where(q_valid, out, jnp.zeros((), out.dtype))


def _cudnn_packed(q: Array, k: Array, v: Array, info: SegmentInfo, segment_ids: Array,
                  scale: float, causal: bool = True) -> Array:
    return cudnn_packed_kernel(q, k, v, info, info, segment_ids, segment_ids, scale, causal)


def _bidirectional_rows(q: Array, k: Array, v: Array, segment_ids: Array,
                        implementation: str) -> Array:
    """Bidirectional attention over rows of one document (ids 1..1 0..0), bounded by the row's
    length. Positions past it are zeroed in and out, so their outputs and gradients are zero
    whatever a kernel leaves there (a row with no document counts as length 1)."""
    lengths = jnp.maximum(jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32), 1)
    valid = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
    q, k, v = (jnp.where(valid, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    out = layers.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return jnp.where(valid, out, jnp.zeros((), out.dtype))


def table_fits(info: SegmentInfo) -> Array:
    """True (scalar) when `packed_attention` needs no dense mask for these rows."""
    return info.unpacked | info.fits


def packed_causal_attention(q: Array, k: Array, v: Array, *, segment_ids: Array,
                            info: SegmentInfo | None = None, implementation: str = "auto",
                            max_segments: int = 16) -> Array:
    """Causal attention of q [b, t, n, h] over k/v [b, t, kv, h] within each row's segments."""
    return packed_attention(q, k, v, segment_ids=segment_ids, info=info, causal=True,
                            implementation=implementation, max_segments=max_segments)


def packed_attention(q: Array, k: Array, v: Array, *, segment_ids: Array,
                     info: SegmentInfo | None = None, causal: bool = True,
                     implementation: str = "auto", max_segments: int = 16,
                     fallback: bool = True) -> Array:
    """Attention of q [b, t, n, h] over k/v [b, t, kv, h] within each row's segments, causal or
    bidirectional. Outputs on padding (id 0) positions are unspecified (they carry no loss).
    `fallback=False`: the caller has checked that the documents fit the table (`table_fits`), so
    the packed kernel's step holds no dense-mask branch (whose backward residuals a `lax.switch`
    keeps alongside the taken branch's)."""
    impl = layers.resolve_attention_impl(implementation, q.dtype, q.shape[-1])
    if impl == "splash" and splash.supported(q.shape[1], q.shape[-1]):
        return splash.splash_attention(q, k, v, segment_ids=segment_ids, causal=causal)
    if info is None:
        info = segment_info(segment_ids, max_segments, groups=batch_groups(q.shape[0]))
    if causal:  # one document a row: its padding keys come after every query of it
        plain = lambda: layers.dot_product_attention(q, k, v, is_causal=True,
                                                     implementation=implementation)
    else:       # ... but a bidirectional query would see them: the row's length bounds the keys
        plain = lambda: _bidirectional_rows(q, k, v, segment_ids, implementation)
    masked = lambda: layers.dot_product_attention(
        q, k, v, mask=layers.make_attention_mask(segment_ids, segment_ids, causal=causal),
        implementation=implementation)
    if uses_packed_kernel(implementation, q.dtype, q.shape[-1]):
        scale = 1.0 / float(q.shape[-1]) ** 0.5
        packed = lambda: _cudnn_packed(q, k, v, info, segment_ids, scale, causal)
        try:
            if not fallback:
                return jax.lax.cond(info.unpacked, plain, packed)
            branch = jnp.where(info.unpacked, 0, jnp.where(info.fits, 1, 2))
            return jax.lax.switch(branch, (plain, packed, masked))
        except (NotImplementedError, ValueError) as e:  # shapes cuDNN's packed layout rejects
            layers.warn_once(f"cuDNN packed attention rejected {q.shape} q / {k.shape} kv "
                             f"(causal={causal}): {e}; packed rows use a dense mask")
    return jax.lax.cond(info.unpacked, plain, masked)
