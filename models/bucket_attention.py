"""Flash attention with T5's relative-position bias kept in its bucket table (Pallas).

T5 adds a learned per-head bias table[head, bucket(key_pos - query_pos)] to every logit. Through a
generic kernel (cuDNN, XLA) that bias is a dense [1, heads, q, k] tensor, and its gradient is the
[batch, heads, q, k] logit gradient written out and reduced over the batch (on an H200, cuDNN's
bias-gradient passes are ~17 ms of T5-large's 57 ms of attention a step). Here the gradient never
leaves the kernel at that size: the bias depends on key - query only, so every [B, B] tile of the
score matrix at the same block offset c = key block - query block has the same bucket pattern,
and beyond a few blocks every tile lies in one saturated bucket (T5's distances past
`max_distance` share the last bucket). The dK/dV pass, which visits every tile of a key block
(computed keys x queries, as FlashAttention-2's backward, so no computed tile is transposed),
sums the logit gradient of each near offset (and of the far tiles on either side) over the batch;
the table's gradient is those few [B, B] sums contracted with their static bucket patterns.
Measured on an H200 it is slower than cuDNN's dense-bias path (BENCHMARKS.md, T5 v1.1-large), so
models use it only when asked (`attention_impl="pallas"`).

Masks: segment ids (packed rows: a token sees its own segment; padding, id 0, sees padding) and
optionally causal. Self-attention only (queries and keys are one sequence). Runs on GPU through
Triton; elsewhere in Pallas's interpret mode (the CPU tests; slow, never chosen automatically).
Under a mesh it runs inside `shard_map` over the batch (and head) axes of the activations.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from zhchat.models import layers

Array = jax.Array
LOG2E = math.log2(math.e)
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_PAD_SEGMENT = -1  # rows added to reach a block multiple: they see only each other


def relative_position_bucket(relative_position, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128):
    """T5's bucket of `relative_position` = key_position - query_position (int32 array, same shape).

    Half of the buckets hold exact small distances, the rest cover distances up to `max_distance`
    logarithmically (larger distances share the last bucket). Bidirectional: keys after the query use
    the upper half of the buckets. Causal (decoder): keys after the query all fall in bucket 0.
    A numpy array in gives a numpy array out (the kernel's static tile plans); the same fp32 math.
    """
    xp = np if isinstance(relative_position, np.ndarray) else jnp
    n = -xp.asarray(relative_position, np.int32)
    bucket = xp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(np.int32) * num_buckets
        n = xp.abs(n)
    else:
        n = xp.maximum(n, 0)
    max_exact = num_buckets // 2
    log_ratio = xp.log(xp.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(np.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int32)
    large = xp.minimum(large, num_buckets - 1)
    return bucket + xp.where(n < max_exact, n, large)


class Relpos(NamedTuple):
    """The bucketing of one table (static)."""

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True

    def buckets(self, relative_position):
        return relative_position_bucket(relative_position, bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets,
                                        max_distance=self.max_distance)


class Blocks(NamedTuple):
    """Tile sizes (powers of two) and Triton warps of the three kernels. The dK/dV tiles are
    square (`bwd`): the bucket patterns need it."""

    fwd_q: int = 64
    fwd_k: int = 64
    fwd_warps: int = 4
    bwd: int = 64
    bwd_warps: int = 4
    dq_q: int = 64
    dq_k: int = 32
    dq_warps: int = 4
    stages: int = 2
    min_programs: int = 4096  # the dK/dV pass splits the batch until it has this many programs
    near_sums: str = "memory"  # the near offsets' sums live in the output tile (read-modify-write
    #                            per tile: frees registers, one loop of code) or in "registers"
    # (the defaults are the fastest measured on an H200: BENCHMARKS.md, T5 v1.1-large)


class _Plan(NamedTuple):
    """Which tiles of the dK/dV pass share a bucket pattern, for one padded length."""

    classes: tuple[int, ...]     # near block offsets c = key block - query block, one sum each
    near: int                    # offsets beyond +-near are far: one bucket per side
    pattern: np.ndarray          # [len(classes), B, B] bucket of each near tile element
    after: int                   # bucket of far tiles with keys after queries
    before: int                  # bucket of far tiles with keys before queries
    has_after: bool
    has_before: bool


def supported(head_dim: int) -> bool:
    """Head dims the kernel takes (Triton tiles are powers of two)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256


def _bucket_vector(length: int, relpos: Relpos) -> np.ndarray:
    """Bucket of every relative position -(length - 1) .. length - 1 (numpy, static)."""
    return np.asarray(relpos.buckets(np.arange(-(length - 1), length, dtype=np.int32)))


def _plan(length: int, block: int, relpos: Relpos, causal: bool) -> _Plan:
    n = length // block
    table = _bucket_vector(length, relpos)
    bucket = lambda r: table[np.asarray(r) + length - 1]  # noqa: E731
    near = n - 1
    for d in range(n - 1):  # the smallest d with one bucket per side beyond it
        after = bucket(np.arange((d + 1) * block - block + 1, length))
        before = bucket(np.arange(-(length - 1), -((d + 1) * block - block + 1) + 1))
        if (causal or len(set(after.tolist())) == 1) and len(set(before.tolist())) == 1:
            near = d
            break
    classes = tuple(range(-near, (0 if causal else near) + 1))
    i = np.arange(block)
    pattern = np.stack([bucket(c * block + i[None, :] - i[:, None]) for c in classes])
    return _Plan(classes=classes, near=near, pattern=pattern.astype(np.int32),
                 after=int(bucket(length - 1)), before=int(bucket(-(length - 1))),
                 has_after=not causal and near < n - 1, has_before=near < n - 1)


def _scores(q, k, bias, q_seg, k_seg, q_pos, k_pos, *, scale, causal):
    """Masked logits of one tile in base 2 (exp2 domain), and the mask."""
    s = plgpu.dot(q, k.T) * (scale * LOG2E) + bias * LOG2E
    mask = q_seg[:, None] == k_seg[None, :]
    if causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    return jnp.where(mask, s, _MASKED), mask


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, bias_ref, o_ref, lse_ref, *, scale, causal, bq, bk):
    qi = pl.program_id(0)
    q = q_ref[...]
    q_seg = seg_ref[pl.ds(qi * bq, bq)]
    q_pos = qi * bq + jnp.arange(bq)

    def body(kb, carry):
        o, m, l = carry
        ks = pl.ds(kb * bk, bk)
        s, _ = _scores(q, k_ref[ks, :], bias_ref[:, ks], q_seg, seg_ref[ks], q_pos,
                       kb * bk + jnp.arange(bk), scale=scale, causal=causal)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * correction + jnp.sum(p, axis=1)
        o = o * correction[:, None] + plgpu.dot(p.astype(v_ref.dtype), v_ref[ks, :])
        return o, m_new, l

    upper = lax.div((qi + 1) * bq + bk - 1, bk) if causal else k_ref.shape[0] // bk
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = lax.fori_loop(0, upper, body, init)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, bias_t_ref,
                 dk_ref, dv_ref, acc_ref, *, scale, causal, block, plan: _Plan, in_memory: bool):
    # Tiles are computed transposed, keys x queries (as FlashAttention-2's Triton backward): the
    # dV and dK products then take the probabilities and logit gradients as they are, with no
    # transpose of a computed tile; only loaded tiles are transposed.
    kj = pl.program_id(2)
    rows, length, head_dim = q_ref.shape
    nq = length // block
    ks = pl.ds(kj * block, block)
    k_pos = kj * block + jnp.arange(block)
    tile_zeros = jnp.zeros((block, block), jnp.float32)
    grad_zeros = jnp.zeros((block, head_dim), jnp.float32)

    def row(r, accs):
        near, after, before = accs
        k, v, k_seg = k_ref[r, ks, :], v_ref[r, ks, :], seg_ref[r, ks]

        def tile(qi, dk, dv, valid=None):
            qs = pl.ds(qi * block, block)
            q, do = q_ref[r, qs, :], do_ref[r, qs, :]
            s_t = plgpu.dot(k, q.T) * (scale * LOG2E) + bias_t_ref[:, qs] * LOG2E
            mask = k_seg[:, None] == seg_ref[r, qs][None, :]
            if causal:
                mask = mask & ((qi * block + jnp.arange(block))[None, :] >= k_pos[:, None])
            if valid is not None:
                mask = mask & valid
            p_t = jnp.where(mask, jnp.exp2(s_t - lse_ref[r, qs][None, :]), 0.0)
            ds_t = p_t * (plgpu.dot(v, do.T) - delta_ref[r, qs][None, :])  # d loss / d logit
            dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
            dk = dk + plgpu.dot((ds_t * scale).astype(q.dtype), q)
            return ds_t, dk, dv

        def far(qi, carry):
            dk, dv, acc = carry
            ds_t, dk, dv = tile(qi, dk, dv)
            return dk, dv, acc + ds_t

        def near_tile(i, carry):
            qi = kj - plan.classes[0] - i
            ds_t, dk, dv = tile(jnp.clip(qi, 0, nq - 1), *carry, (qi >= 0) & (qi < nq))
            acc_ref[i, :, :] = acc_ref[i, :, :] + ds_t
            return dk, dv

        dk, dv = grad_zeros, grad_zeros
        if plan.has_after:  # query blocks more than `near` before the key block
            dk, dv, after = lax.fori_loop(0, jnp.maximum(kj - plan.near, 0), far,
                                          (dk, dv, after))
        sums = []
        if in_memory:
            dk, dv = lax.fori_loop(0, len(plan.classes), near_tile, (dk, dv))
        else:
            for c, acc in zip(plan.classes, near):
                qi = kj - c
                ds_t, dk, dv = tile(jnp.clip(qi, 0, nq - 1), dk, dv, (qi >= 0) & (qi < nq))
                sums.append(acc + ds_t)
        if plan.has_before:
            dk, dv, before = lax.fori_loop(kj + plan.near + 1, nq, far, (dk, dv, before))
        dk_ref[r, :, :] = dk.astype(dk_ref.dtype)
        dv_ref[r, :, :] = dv.astype(dv_ref.dtype)
        return tuple(sums), after, before

    if in_memory:
        for i in range(len(plan.classes)):
            acc_ref[i, :, :] = tile_zeros
    init = (() if in_memory else tuple(tile_zeros for _ in plan.classes), tile_zeros, tile_zeros)
    near, after, before = lax.fori_loop(0, rows, row, init)
    first = len(plan.classes) if in_memory else 0
    for i, acc in enumerate(near + (after, before)):
        acc_ref[first + i, :, :] = acc


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, bias_ref, dq_ref, *,
               scale, causal, bq, bk):
    qi = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    q_seg = seg_ref[pl.ds(qi * bq, bq)]
    q_pos = qi * bq + jnp.arange(bq)
    lse, delta = lse_ref[...], delta_ref[...]

    def body(kb, dq):
        ks = pl.ds(kb * bk, bk)
        k = k_ref[ks, :]
        s, mask = _scores(q, k, bias_ref[:, ks], q_seg, seg_ref[ks], q_pos,
                          kb * bk + jnp.arange(bk), scale=scale, causal=causal)
        p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
        ds = p * (plgpu.dot(do, v_ref[ks, :].T) - delta[:, None])
        return dq + plgpu.dot((ds * scale).astype(k.dtype), k)

    upper = lax.div((qi + 1) * bq + bk - 1, bk) if causal else k_ref.shape[0] // bk
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _full_bias(table: Array, length: int, relpos: Relpos, *, transposed: bool = False) -> Array:
    """[heads, query, key] bias (fp32), or [heads, key, query] when `transposed`."""
    pos = jnp.arange(length)
    rel = pos[None, :] - pos[:, None]                              # key - query
    rel = -rel if transposed else rel
    buckets = jnp.asarray(_bucket_vector(length, relpos))[rel + length - 1]
    return jnp.take(table.astype(jnp.float32), buckets, axis=1)


def _params(blocks: Blocks, warps: int):
    return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.stages)


def _forward(q, k, v, table, seg, relpos, causal, scale, blocks, interpret):
    b, t, n, h = q.shape
    bq, bk = blocks.fwd_q, blocks.fwd_k
    bias = _full_bias(table, t, relpos)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk),
        grid=(t // bq, b, n),
        in_specs=[pl.BlockSpec((None, bq, None, h), lambda i, j, m: (j, i, m, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, j, m: (j, 0, m, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, j, m: (j, 0, m, 0)),
                  pl.BlockSpec((None, t), lambda i, j, m: (j, 0)),
                  pl.BlockSpec((None, bq, t), lambda i, j, m: (m, i, 0))],
        out_specs=[pl.BlockSpec((None, bq, None, h), lambda i, j, m: (j, i, m, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, j, m: (j, m, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_params(blocks, blocks.fwd_warps), interpret=interpret,
        name="bucket_attention_fwd",
    )(q, k, v, seg, bias)
    return out, lse


def _splits(batch: int, programs: int, target: int) -> int:
    return next((s for s in range(1, batch + 1) if batch % s == 0 and s * programs >= target),
                batch)


def _dkdv(q, k, v, do, lse, delta, seg, bias_t, plan, causal, scale, blocks, interpret):
    """dK, dV and the per-offset sums of the logit gradient [splits, heads, nk, slots, B, B]
    (each tile keys x queries)."""
    b, t, n, h = q.shape
    blk = blocks.bwd
    nk = t // blk
    splits = _splits(b, n * nk, blocks.min_programs)
    rows = b // splits
    slots = len(plan.classes) + 2
    full = pl.BlockSpec((rows, t, None, h), lambda s, m, j: (s, 0, m, 0))
    per_head = pl.BlockSpec((rows, None, t), lambda s, m, j: (s, m, 0))
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, causal=causal, block=blk, plan=plan,
                          in_memory=blocks.near_sums == "memory"),
        grid=(splits, n, nk),
        in_specs=[full, full, full, full, per_head, per_head,
                  pl.BlockSpec((rows, t), lambda s, m, j: (s, 0)),
                  pl.BlockSpec((None, blk, t), lambda s, m, j: (m, j, 0))],
        out_specs=[pl.BlockSpec((rows, blk, None, h), lambda s, m, j: (s, j, m, 0)),
                   pl.BlockSpec((rows, blk, None, h), lambda s, m, j: (s, j, m, 0)),
                   pl.BlockSpec((None, None, None, slots, blk, blk),
                                lambda s, m, j: (s, m, j, 0, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((splits, n, nk, slots, blk, blk), jnp.float32)],
        compiler_params=_params(blocks, blocks.bwd_warps), interpret=interpret,
        name="bucket_attention_dkdv",
    )(q, k, v, do, lse, delta, seg, bias_t)


def _dq(q, k, v, do, lse, delta, seg, bias, causal, scale, blocks, interpret):
    b, t, n, h = q.shape
    bq, bk = blocks.dq_q, blocks.dq_k
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bk=bk),
        grid=(t // bq, b, n),
        in_specs=[pl.BlockSpec((None, bq, None, h), lambda i, j, m: (j, i, m, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, j, m: (j, 0, m, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, j, m: (j, 0, m, 0)),
                  pl.BlockSpec((None, bq, None, h), lambda i, j, m: (j, i, m, 0)),
                  pl.BlockSpec((None, None, bq), lambda i, j, m: (j, m, i)),
                  pl.BlockSpec((None, None, bq), lambda i, j, m: (j, m, i)),
                  pl.BlockSpec((None, t), lambda i, j, m: (j, 0)),
                  pl.BlockSpec((None, bq, t), lambda i, j, m: (m, i, 0))],
        out_specs=pl.BlockSpec((None, bq, None, h), lambda i, j, m: (j, i, m, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(blocks, blocks.dq_warps), interpret=interpret,
        name="bucket_attention_dq",
    )(q, k, v, do, lse, delta, seg, bias)


def _table_grad(acc: Array, plan: _Plan, heads: int, num_buckets: int) -> Array:
    """[heads, buckets] from the per-offset sums: each near sum through its bucket pattern, the
    far sums into their side's saturated bucket."""
    sums = jnp.sum(acc, axis=(0, 2))                                  # [heads, slots, B, B]
    c = len(plan.classes)
    pattern = np.swapaxes(plan.pattern, 1, 2)            # the sums are key x query tiles
    onehot = jax.nn.one_hot(pattern.reshape(-1), num_buckets, dtype=jnp.float32)
    dtable = jnp.einsum("hn,nb->hb", sums[:, :c].reshape(heads, -1), onehot)
    for slot, bucket in ((c, plan.after), (c + 1, plan.before)):
        dtable += jnp.sum(sums[:, slot], axis=(1, 2))[:, None] * jax.nn.one_hot(bucket,
                                                                                 num_buckets)
    return dtable


def backward_inputs(table, out, do, relpos, causal, blocks):
    """What both backward passes read besides q, k, v, dO, the LSE and segments: the row deltas
    sum(out * dO) [b, heads, len], the bias for the dQ pass and transposed for the dK/dV pass,
    and the dK/dV pass's tile plan (also the kernel benchmark's per-pass timing)."""
    t = out.shape[1]
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
    return (delta, _full_bias(table, t, relpos), _full_bias(table, t, relpos, transposed=True),
            _plan(t, blocks.bwd, relpos, causal))


def _backward(q, k, v, table, seg, out, lse, do, relpos, causal, scale, blocks, interpret):
    n = q.shape[2]
    delta, bias, bias_t, plan = backward_inputs(table, out, do, relpos, causal, blocks)
    dk, dv, acc = _dkdv(q, k, v, do, lse, delta, seg, bias_t, plan, causal, scale, blocks,
                        interpret)
    dq = _dq(q, k, v, do, lse, delta, seg, bias, causal, scale, blocks, interpret)
    dtable = _table_grad(acc, plan, n, relpos.num_buckets)
    return dq, dk, dv, dtable.astype(table.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, table, seg, relpos, causal, scale, blocks, interpret):
    return _forward(q, k, v, table, seg, relpos, causal, scale, blocks, interpret)[0]


def _attention_fwd(q, k, v, table, seg, relpos, causal, scale, blocks, interpret):
    out, lse = _forward(q, k, v, table, seg, relpos, causal, scale, blocks, interpret)
    return out, (q, k, v, table, seg, out, lse)


def _attention_bwd(relpos, causal, scale, blocks, interpret, residuals, do):
    q, k, v, table, seg, out, lse = residuals
    dq, dk, dv, dtable = _backward(q, k, v, table, seg, out, lse, do, relpos, causal, scale,
                                   blocks, interpret)
    return dq, dk, dv, dtable, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pad_to_tiles(blocks: Blocks, seg: Array, *xs: Array) -> tuple[Array, ...]:
    """`seg` [b, t] and each [b, t, ...] of `xs` padded along t to a multiple of every tile; the
    added rows get a segment of their own (they see only each other)."""
    t = seg.shape[1]
    pad = -t % max(blocks.fwd_q, blocks.fwd_k, blocks.bwd, blocks.dq_q, blocks.dq_k)
    if not pad:
        return (seg, *xs)
    widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)  # noqa: E731
    return (jnp.pad(seg, widths(seg), constant_values=_PAD_SEGMENT),
            *(jnp.pad(x, widths(x)) for x in xs))


def _local(q, k, v, table, seg, *, relpos, causal, scale, blocks, interpret):
    t = q.shape[1]
    seg, q, k, v = pad_to_tiles(blocks, seg, q, k, v)
    out = _attention(q, k, v, table, seg, relpos, causal, scale, blocks, interpret)
    return out[:, :t]


def bucket_attention(q: Array, k: Array, v: Array, table: Array, *, segment_ids: Array,
                     relpos: Relpos = Relpos(), causal: bool = False, scale: float = 1.0,
                     blocks: Blocks = Blocks(), interpret: bool | None = None) -> Array:
    """softmax(scale * q k^T + table[:, bucket(j - i)], masked) v over q/k/v [b, t, heads, h].

    `table` [heads, num_buckets]; `segment_ids` [b, t] (int; the mask of `make_attention_mask`).
    Differentiable in q, k, v and the table. Rows of segment 0 see each other (padding outputs are
    defined but carry nothing)."""
    b, t, n, h = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"bucket attention is self-attention with equal head counts: "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if not supported(h):
        raise ValueError(f"bucket attention needs a power-of-two head dim in [16, 256], got {h}")
    if blocks.near_sums not in ("registers", "memory"):
        raise ValueError(f"Blocks.near_sums must be 'registers' or 'memory', got "
                         f"{blocks.near_sums!r}")
    if table.shape != (n, relpos.num_buckets):
        raise ValueError(f"table {table.shape} is not [heads, buckets] = ({n}, "
                         f"{relpos.num_buckets})")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    fn = functools.partial(_local, relpos=relpos, causal=causal, scale=scale, blocks=blocks,
                           interpret=interpret)
    seg = segment_ids.astype(jnp.int32)
    mesh, batch, heads = layers.kernel_mesh_axes(n)
    if mesh is None:
        return fn(q, k, v, table, seg)
    qkv = P(batch, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(heads, None), P(batch, None)),
                         out_specs=qkv, check_vma=False)(q, k, v, table, seg)
