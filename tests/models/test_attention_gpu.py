"""GPU-only: cuDNN's packed flash attention (models/attention.py) equals the masked XLA reference,
forward and backward, in bf16 (skipped without a Hopper GPU).

Run on the GPU machine: python -m pytest tests/models/test_attention_gpu.py -q
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import attention, layers

pytestmark = pytest.mark.skipif(not attention.cudnn_packed_available(),
                                reason="needs a Hopper GPU (cuDNN packed attention)")


def _packing(b, t, rng, mean_len):
    rows = []
    for _ in range(b):
        row, sid, pos = np.zeros(t, np.int32), 1, 0
        while pos < t - 16:
            n = int(rng.integers(1, 2 * mean_len))
            row[pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def _qkv(b, t, n, kv, h, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(kk, (b, t, heads, h), jnp.bfloat16)
            for kk, heads in zip(keys, (n, kv, kv))]


def _loss_and_grads(fn, q, k, v, seg):
    valid = (seg != 0)[:, :, None, None]
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

    def loss(q, k, v):
        out = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(jnp.where(valid, out * w, 0.0))
    out = jax.jit(fn)(q, k, v).astype(jnp.float32)
    return jnp.where(valid, out, 0.0), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("mean_len,max_segments,heads", [(300, 16, (8, 2, 64)),
                                                         (40, 64, (8, 8, 128)),
                                                         (20, 8, (4, 1, 64))])
def test_packed_cudnn_equals_masked_xla(mean_len, max_segments, heads):
    """Short and long documents, GQA and MHA, and (mean 20, 8 slots) rows with more documents
    than slots, which must take the masked path and still be right."""
    b, t = 4, 1024
    seg = _packing(b, t, np.random.default_rng(mean_len), mean_len)
    q, k, v = _qkv(b, t, *heads)
    fast = lambda q, k, v: attention.packed_causal_attention(
        q, k, v, segment_ids=seg, implementation="cudnn", max_segments=max_segments)
    mask = layers.make_attention_mask(seg, seg, causal=True)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    (o1, g1), (o2, g2) = _loss_and_grads(fast, q, k, v, seg), _loss_and_grads(ref, q, k, v, seg)
    np.testing.assert_allclose(o1, o2, atol=2e-2)
    for a, r in zip(g1, g2):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.linalg.norm(a - r) <= 2e-2 * np.linalg.norm(r), np.abs(a - r).max()


def test_packed_kernel_alone_equals_masked_xla():
    """The packed kernel itself (not the dispatch), zero on padding."""
    b, t = 2, 512
    seg = _packing(b, t, np.random.default_rng(1), 50)
    q, k, v = _qkv(b, t, 8, 4, 64, seed=3)
    info = attention.segment_info(seg, 32)
    assert bool(info.fits) and not bool(info.unpacked)
    out = jax.jit(lambda q, k, v: attention._cudnn_packed(q, k, v, info, seg, 0.125))(q, k, v)
    mask = layers.make_attention_mask(seg, seg, causal=True)
    ref = layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    valid = np.asarray(seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.where(valid, np.asarray(ref, np.float32), 0), atol=2e-2)
    assert "cudnn" in jax.jit(lambda q, k, v: attention._cudnn_packed(
        q, k, v, info, seg, 0.125)).lower(q, k, v).as_text().lower()
