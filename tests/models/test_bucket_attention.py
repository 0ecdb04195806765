"""The bucket-bias flash kernel (models/bucket_attention.py, Pallas interpret mode on CPU) equals
dense XLA attention with T5's [1, heads, q, k] bias and the segment mask: outputs and the gradients
of q, k, v and the bucket table, causal and bidirectional, packed and padded rows, with tiles small
enough that near, far and clamped-edge tiles all occur."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import bucket_attention as ba
from zhchat.models import layers

SMALL = ba.Blocks(fwd_q=16, fwd_k=16, bwd=16, dq_q=16, dq_k=16, min_programs=4)
SMALL_MEMORY = SMALL._replace(near_sums="memory")


def _segments(b, t, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(b):
        row, pos, sid = np.zeros(t, np.int32), 0, 1
        end = t - int(rng.integers(0, t // 4))          # right padding
        while pos < end:
            n = int(rng.integers(5, 60)) if r else end  # row 0: one document
            row[pos:min(pos + n, end)] = sid
            pos, sid = pos + n, sid + 1
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def _reference(q, k, v, table, seg, relpos, causal, scale):
    t = q.shape[1]
    pos = jnp.arange(t)
    bias = jnp.take(table, relpos.buckets(pos[None, :] - pos[:, None]), axis=1)[None]
    mask = layers.make_attention_mask(seg, seg, causal=causal)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale + bias
    logits = jnp.where(mask, logits, -1e30)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v)


def _inputs(b, t, n, h, buckets, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.float32) for kk in keys[:3])
    table = jax.random.normal(keys[3], (n, buckets), jnp.float32)
    w = jax.random.normal(keys[4], (b, t, n, h), jnp.float32)
    return q, k, v, table, w


@pytest.mark.parametrize("relpos,t,causal", [
    (ba.Relpos(32, 128, True), 200, False),   # near tiles + far tiles on both sides
    (ba.Relpos(32, 128, True), 200, True),
    (ba.Relpos(8, 16, True), 100, False),     # one near offset only
    (ba.Relpos(8, 16, True), 100, True),
    (ba.Relpos(32, 128, False), 72, True),    # the decoder's bucketing
    (ba.Relpos(8, 16, False), 120, True)])
@pytest.mark.parametrize("blocks", [SMALL, SMALL_MEMORY], ids=["registers", "memory"])
def test_kernel_equals_dense_reference(relpos, t, causal, blocks):
    b, n, h = 3, 2, 16
    q, k, v, table, w = _inputs(b, t, n, h, relpos.num_buckets, seed=t)
    seg = _segments(b, t, seed=t)
    valid = (seg != 0)[:, :, None, None]
    scale = 0.5

    def loss(fn):
        return lambda q, k, v, table: jnp.sum(jnp.where(valid, fn(q, k, v, table) * w, 0.0))

    kernel = lambda q, k, v, table: ba.bucket_attention(  # noqa: E731
        q, k, v, table, segment_ids=seg, relpos=relpos, causal=causal, scale=scale, blocks=blocks)
    dense = lambda q, k, v, table: _reference(q, k, v, table, seg, relpos, causal, scale)  # noqa: E731
    got, want = kernel(q, k, v, table), dense(q, k, v, table)
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)
    g_got = jax.grad(loss(kernel), argnums=(0, 1, 2, 3))(q, k, v, table)
    g_want = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(q, k, v, table)
    for name, a, e in zip(("dq", "dk", "dv", "dtable"), g_got, g_want):
        np.testing.assert_allclose(a, e, atol=2e-4, rtol=2e-4, err_msg=name)
    assert float(jnp.abs(g_want[3]).max()) > 1e-2   # the table gradient is not trivially zero


def test_plan_groups_tiles_by_bucket_pattern():
    """T5's encoder bucketing saturates at distance 91: with 64-wide tiles, offsets beyond +-2
    blocks are one bucket per side, so 5 near sums + 2 far sums cover a 512-long attention."""
    plan = ba._plan(512, 64, ba.Relpos(32, 128, True), causal=False)
    assert plan.classes == (-2, -1, 0, 1, 2) and plan.has_after and plan.has_before
    assert (plan.after, plan.before) == (31, 15)
    causal = ba._plan(128, 32, ba.Relpos(32, 128, False), causal=True)
    assert causal.classes[-1] == 0 and not causal.has_after


@pytest.mark.parametrize("relpos", [ba.Relpos(32, 128, True), ba.Relpos(32, 128, False),
                                    ba.Relpos(8, 16, True), ba.Relpos(64, 256, True)])
def test_static_buckets_equal_traced_buckets(relpos):
    """The kernel plans its tiles with numpy buckets; they equal the jnp buckets of the dense
    path (decoding) everywhere, log-bucket edges included."""
    rel = np.arange(-8192, 8193, dtype=np.int32)
    np.testing.assert_array_equal(relpos.buckets(rel), np.asarray(relpos.buckets(jnp.asarray(rel))))


def test_rejects_shapes_it_cannot_take():
    q = jnp.zeros((1, 32, 2, 24))
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ba.bucket_attention(q, q, q, jnp.zeros((2, 32)), segment_ids=jnp.ones((1, 32)))
    q = jnp.zeros((1, 32, 2, 16))
    with pytest.raises(ValueError, match="table"):
        ba.bucket_attention(q, q, q, jnp.zeros((3, 32)), segment_ids=jnp.ones((1, 32)))
