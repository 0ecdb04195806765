"""T5-specific layers: relative position buckets/biases, attention with a decode cache, gated-GELU MLP.

Built on the shared layers (models/layers.py). T5 does not scale attention logits by 1/sqrt(head_dim):
the query projection's initialisation absorbs the factor instead (as in T5X), so checkpoints convert to
and from HF T5 unchanged. Decoding caches keys/values of the decoder self-attention (written one position
per step) and the cross-attention keys/values of the encoder output (computed once, when the cache is
created).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from zhchat.models import bucket_attention, cross_attention, layers
from zhchat.models.bucket_attention import relative_position_bucket  # noqa: F401 (T5's bucketing)

Array = jax.Array
DType = Any


class RelativePositionBiases(nn.Module):
    """Learned per-head bias for each relative-position bucket: [1, heads, q_len, k_len], or (for
    the bucket kernel) the table itself with the batch's segment ids (`bucketed`)."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self):
        self.rel_embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                         ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), self.param_dtype)

    @property
    def relpos(self) -> bucket_attention.Relpos:
        return bucket_attention.Relpos(self.num_buckets, self.max_distance, self.bidirectional)

    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        buckets = self.relpos.buckets(key_positions[None, :] - query_positions[:, None])
        # one-hot matmul instead of a gather: its gradient is a matmul, not a scatter-add of q*k
        # updates into a few buckets (slow on accelerators)
        onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)  # [q, k, buckets]
        bias = jnp.einsum("hb,qkb->hqk", jnp.asarray(self.rel_embedding, self.dtype), onehot)
        return bias[None]

    def bucketed(self, segment_ids: Array) -> BucketBias:
        """The table (fp32) and `segment_ids` [batch, len], for self-attention over positions
        0..len-1 (what `__call__(arange, arange)` describes densely)."""
        return BucketBias(table=jnp.asarray(self.rel_embedding, jnp.float32),
                          segment_ids=segment_ids, relpos=self.relpos)


@struct.dataclass
class BucketBias:
    """T5's bias in table form plus the segment ids that mask the batch: what the bucket kernel
    (models/bucket_attention.py) takes in place of a dense bias and mask."""

    table: Array                  # [heads, buckets]
    segment_ids: Array            # [batch, len]; 0 is padding
    relpos: bucket_attention.Relpos = struct.field(pytree_node=False)


class PackedCross(NamedTuple):
    """Cross-attention's segment ids with their cuDNN tables: what T5Attention takes in place of
    the dense cross mask on a packed batch (models/cross_attention.py)."""

    query_segment_ids: Array       # [batch, dec_len] decoder segments
    kv_segment_ids: Array          # [batch, enc_len] encoder segments
    info: cross_attention.CrossInfo


class PaddingLengths(NamedTuple):
    """Per-row valid lengths for attention over unpacked rows (see T5Attention)."""

    query: Array     # [batch] int32, at least 1
    kv: Array        # [batch] int32, at least 1


def padding_lengths(query_segments: Array, kv_segments: Array) -> PaddingLengths:
    """Lengths of 1..1 0..0 rows (floored at 1 so an all-padding row stays finite)."""
    length = lambda seg: jnp.maximum(jnp.sum(seg > 0, axis=1), 1).astype(jnp.int32)  # noqa: E731
    return PaddingLengths(length(query_segments), length(kv_segments))


def _scaled_init(scale: float):
    base = layers.default_kernel_init
    return lambda rng, shape, dtype: base(rng, shape, dtype) * scale


class T5Attention(nn.Module):
    """Multi-head attention without logit scaling. Self-attention caches K/V in decode mode
    (`decode_index` = the position being written); cross-attention caches the encoder's K/V once."""

    num_heads: int
    head_dim: int
    cross: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, kv_inputs: Array | None, *, mask: Array | None, bias: Array | None = None,
                 decode: bool = False, decode_index: Array | None = None,
                 max_decode_length: int | None = None, lengths: PaddingLengths | None = None,
                 causal: bool = False) -> Array:
        """`mask` is the dense mask of any (packed) batch. With `lengths` (batches without segment
        ids: each row one example plus right-padding) attention uses sequence lengths (+ `causal`)
        instead, so cuDNN runs its fused padding / causal masks and takes only the [1, heads, q, k]
        bias (a dense mask is folded into a [batch, heads, q, k] bias and bias gradient). A
        `BucketBias` (self-attention in training) goes to the bucket kernel with its segment ids,
        packed or not; `mask` and `lengths` are then unused. A `PackedCross` mask (packed rows'
        cross-attention) goes to cuDNN's packed layout with its segment tables."""
        proj = dict(features=(self.num_heads, self.head_dim), kernel_axes=("embed", "heads", "kv"),
                    dtype=self.dtype, param_dtype=self.param_dtype)
        query = layers.DenseGeneral(name="query", kernel_init=_scaled_init(self.head_dim ** -0.5),
                                    **proj)(x)
        key_layer = layers.DenseGeneral(name="key", **proj)
        value_layer = layers.DenseGeneral(name="value", **proj)
        if self.cross:
            key, value = self._cross_kv(kv_inputs, key_layer, value_layer, decode)
        else:
            key, value = key_layer(x), value_layer(x)
            if decode:
                key, value = self._update_self_cache(key, value, decode_index, max_decode_length)
        axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        query, key, value = (nn.with_logical_constraint(t, axes) for t in (query, key, value))
        attend = lambda **kw: layers.dot_product_attention(  # noqa: E731
            query, key, value, bias=bias, scale=1.0, implementation=self.attention_impl, **kw)
        if isinstance(bias, BucketBias):
            if self.cross or decode:
                raise ValueError(f"{self.name}: a BucketBias is for self-attention in training")
            out = bucket_attention.bucket_attention(
                query, key, value, bias.table, segment_ids=bias.segment_ids, relpos=bias.relpos,
                causal=causal, scale=1.0)
        elif isinstance(mask, PackedCross):
            out = cross_attention.packed_cross_attention(
                query, key, value, query_segment_ids=mask.query_segment_ids,
                kv_segment_ids=mask.kv_segment_ids, info=mask.info,
                implementation=self.attention_impl, scale=1.0)
        elif lengths is None or decode:
            out = attend(mask=mask)
        else:
            out = attend(is_causal=causal, query_seq_lengths=lengths.query,
                         key_value_seq_lengths=lengths.kv)
        return layers.DenseGeneral(features=x.shape[-1], axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                                   dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)

    def _cross_kv(self, encoded, key_layer, value_layer, decode):
        if not decode:
            return key_layer(encoded), value_layer(encoded)
        if self.has_variable("cache", "cross_key"):  # later steps: read what the first call stored
            return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        if encoded is None:
            raise ValueError(f"{self.name}: the first decode call must receive the encoder output")
        key, value = key_layer(encoded), value_layer(encoded)
        self.put_variable("cache", "cross_key", key)
        self.put_variable("cache", "cross_value", value)
        return key, value

    def _update_self_cache(self, key, value, index, max_length):
        batch, _, heads, head_dim = key.shape
        initialised = self.has_variable("cache", "cached_key")
        shape = (batch, max_length, heads, head_dim)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        if not initialised:  # the cache-creating call only allocates (nothing is written)
            return key, value
        if key.shape[1] != 1:
            raise ValueError(f"{self.name}: decode steps take one token at a time, got {key.shape[1]}")
        start = (0, index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(key.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        return cached_key.value, cached_value.value


class GatedGeluMlp(nn.Module):
    """T5 v1.1 feed-forward: wo(gelu(wi_0 x) * wi_1 x), with dropout on the hidden activations."""

    d_ff: int
    dropout_rate: float = 0.0
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        dense = dict(features=self.d_ff, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype)
        h = nn.gelu(layers.DenseGeneral(name="wi_0", **dense)(x), approximate=True)
        h = h * layers.DenseGeneral(name="wi_1", **dense)(x)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return layers.DenseGeneral(features=x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="wo")(h)
