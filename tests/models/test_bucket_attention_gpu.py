"""GPU-only: the bucket kernel compiled by Triton (models/bucket_attention.py) equals dense XLA
attention with T5's bias, forward and the gradients of q, k, v and the table, in bf16, on T5's
encoder (bidirectional) and decoder (causal) bucketings, packed and padded rows (skipped without
a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.benchmarks import attention_kernels
from zhchat.models import bucket_attention as ba
from zhchat.models import layers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                                 reason="needs a GPU (Triton)")]


def _reference(q, k, v, table, seg, relpos, causal):
    t = q.shape[1]
    pos = jnp.arange(t)
    bias = jnp.take(table, relpos.buckets(pos[None, :] - pos[:, None]), axis=1)[None]
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) + bias
    logits = jnp.where(layers.make_attention_mask(seg, seg, causal=causal), logits, -1e30)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))


@pytest.mark.parametrize("t,causal,mean", [(512, False, 0), (114, True, 0), (512, False, 60),
                                           (300, True, 40)])
@pytest.mark.parametrize("tiles", [ba.Blocks(), ba.Blocks(bwd=32, near_sums="registers",
                                                            min_programs=264)])
def test_triton_kernel_equals_dense_reference(t, causal, mean, tiles):
    b, n, h = 4, 4, 64
    seg = attention_kernels.packed_segments(b, t, mean, np.random.default_rng(t + mean))
    seg = jnp.asarray(seg)
    relpos = ba.Relpos(32, 128, bidirectional=not causal)
    keys = jax.random.split(jax.random.PRNGKey(t), 5)
    q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys[:3])
    table = jax.random.normal(keys[3], (n, 32), jnp.float32)
    w = jax.random.normal(keys[4], (b, t, n, h), jnp.float32) * (seg != 0)[:, :, None, None]

    kernel = lambda q, k, v, tb: ba.bucket_attention(  # noqa: E731
        q, k, v, tb, segment_ids=seg, relpos=relpos, causal=causal, blocks=tiles)
    dense = lambda q, k, v, tb: _reference(q, k, v, tb, seg, relpos, causal)  # noqa: E731
    loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)  # noqa: E731
    got = jax.jit(kernel)(q, k, v, table).astype(jnp.float32) * (w != 0)
    want = jax.jit(dense)(q, k, v, table) * (w != 0)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    g_got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2, 3)))(q, k, v, table)
    g_want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2, 3)))(q, k, v, table)
    for name, a, e in zip(("dq", "dk", "dv", "dtable"), g_got, g_want):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        scale = np.abs(e).max()
        assert np.abs(a - e).max() <= 2e-2 * scale, (name, np.abs(a - e).max(), scale)
