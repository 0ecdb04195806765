"""Packed-row attention (models/attention.py): the segment layout handed to cuDNN's packed kernel
and the dispatch between the causal, packed and masked paths. The cuDNN kernel itself is checked
against XLA in tests/models/test_attention_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import attention, layers


def _mask_from_info(info, t):
    """The attention mask the packed layout describes: token i sees j when both lie in one
    segment [offset, offset + length) and j <= i."""
    lengths, offsets = np.asarray(info.lengths), np.asarray(info.offsets)
    b = lengths.shape[0]
    mask = np.zeros((b, 1, t, t), bool)
    for r in range(b):
        for off, n in zip(offsets[r], lengths[r]):
            if n < 0:
                continue
            for i in range(off, off + n):
                mask[r, 0, i, off:i + 1] = True
    return mask


def test_segment_info_lengths_and_offsets():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 2, 2, 3, 0, 0, 0, 0]], jnp.int32)
    info = attention.segment_info(seg, 3)
    np.testing.assert_array_equal(info.lengths, [[2, 3, -1], [8, -1, -1], [1, 2, 1]])
    np.testing.assert_array_equal(info.offsets, [[0, 2, -1, -1], [0, -1, -1, -1],
                                                 [0, 1, 3, -1]])
    assert bool(info.fits) and not bool(info.unpacked)
    assert not bool(attention.segment_info(seg, 2).fits)  # row 3 has 3 segments
    assert bool(attention.segment_info(seg[1:2], 2).unpacked)
    with pytest.raises(ValueError, match="max_segments"):
        attention.segment_info(seg, 1)


def test_segment_info_describes_the_segment_mask_on_real_packing():
    """Random packings (documents of 1..40 tokens, trailing padding): the layout given to the
    kernel allows exactly what the dense segment mask allows on non-padding queries."""
    rng = np.random.default_rng(0)
    t, rows = 96, []
    for _ in range(6):
        row, sid, pos = np.zeros(t, np.int32), 1, 0
        while pos < t - 8:
            n = int(rng.integers(1, 41))
            row[pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
        rows.append(row)
    seg = jnp.asarray(np.stack(rows))
    info = attention.segment_info(seg, 16)
    assert bool(info.fits)
    dense = np.asarray(layers.make_attention_mask(seg, seg, causal=True))
    valid = np.asarray(seg != 0)[:, None, :, None]
    np.testing.assert_array_equal(_mask_from_info(info, t), dense & valid)


def test_packed_causal_attention_xla_matches_dense_mask_and_causal():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 32, 4, 16))
    k, v = (jax.random.normal(kk, (2, 32, 2, 16)) for kk in keys[1:])
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 8, axis=1).repeat(2, 0))
    got = jax.jit(lambda q, k, v: attention.packed_causal_attention(
        q, k, v, segment_ids=seg, max_segments=4))(q, k, v)
    mask = layers.make_attention_mask(seg, seg, causal=True)
    want = layers.dot_product_attention(q, k, v, mask=mask)
    valid = np.asarray(seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5)
    one = jnp.ones((2, 32), jnp.int32)  # unpacked rows: the plain causal path
    np.testing.assert_allclose(
        attention.packed_causal_attention(q, k, v, segment_ids=one),
        layers.dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
