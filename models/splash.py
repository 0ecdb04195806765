"""Causal or bidirectional attention through splash attention (jax's Pallas TPU kernel) with
segment ids.

On TPU this is the flash path for both one-document and packed rows: the kernel takes the segment
ids itself and skips blocks that no query of a block may see. Elsewhere it runs in Pallas's
interpret mode (what the CPU tests use; slow, never chosen by "auto"). Grouped-query attention maps
onto the kernel's multi-query form, one call per key/value head. Under an active mesh the kernel
runs inside `shard_map` over the batch's data-parallel axes (and the heads' tensor axis when both
head counts divide it), since a Pallas kernel is not partitioned by XLA.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zhchat.models import layers

Array = jax.Array
BLOCKS = (512, 256, 128)


def supported(seq_len: int, head_dim: int) -> bool:
    """Whether splash takes these shapes: a head dim of 128 lanes' multiple, a length of 128's."""
    return head_dim % 128 == 0 and seq_len % 128 == 0


def _kernel(seq_len: int, group: int, interpret: bool, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(b for b in BLOCKS if seq_len % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    shape = (seq_len, seq_len)
    one = sm.CausalMask(shape) if causal else sm.FullMask(shape)
    mask = sm.MultiHeadMask([one for _ in range(group)])
    return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret), sk


def _local(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool,
           causal: bool) -> Array:
    b, t, n, h = q.shape
    kv = k.shape[2]
    kernel, sk = _kernel(t, n // kv, interpret, causal)
    q = (q * (1.0 / math.sqrt(h))).astype(q.dtype)
    # [b, t, n, h] -> [b, kv, group, t, h]; k/v -> [b, kv, t, h]
    qg = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    kg, vg = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))

    def one(qe, ke, ve, seg):
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qe, ke, ve)

    out = jax.vmap(one)(qg, kg, vg, segment_ids.astype(jnp.int32))  # [b, kv, group, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_causal_attention(q: Array, k: Array, v: Array, *, segment_ids: Array | None = None,
                            interpret: bool | None = None) -> Array:
    """Causal attention of q [b, t, n, h] over k/v [b, t, kv, h] within segments (all one segment
    when `segment_ids` is None)."""
    return splash_attention(q, k, v, segment_ids=segment_ids, causal=True, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, *, segment_ids: Array | None = None,
                     causal: bool = True, interpret: bool | None = None) -> Array:
    """Attention of q [b, t, n, h] over k/v [b, t, kv, h] within segments, causal or not (a
    non-causal call lets padding, id 0, see padding: callers discard those outputs)."""
    b, t, n, h = q.shape
    if not supported(t, h):
        raise ValueError(f"splash attention needs head_dim % 128 == 0 and len % 128 == 0, "
                         f"got head_dim {h}, len {t}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    fn = functools.partial(_local, interpret=interpret, causal=causal)
    mesh, batch, heads = layers.kernel_mesh_axes(n, k.shape[2])
    if mesh is None:
        return fn(q, k, v, seg)
    qkv_spec, seg_spec = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, seg)
