"""Packed cross-attention (models/cross_attention.py): the segment pairing check, and the packed
route with cuDNN's kernel emulated from its two segment tables equals the dense cross mask, for
the attention alone and through the whole T5 (loss and every gradient), unsharded and under the
trainer's 2x2x2 mesh of 8 CPU devices. The kernel itself is pinned on the GPU
(tests/models/test_attention_gpu.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import attention, cross_attention, layers, t5
from zhchat.models.encdec_model import EncoderDecoderModel
from zhchat.trainer import partitioning, train_state


def _doc(info, t):
    """[b, t] the table's document number (1-based) of every token, 0 outside every document."""
    b = info.lengths.shape[0]
    flat = jnp.arange(b * t)
    start = (jnp.arange(b)[:, None] * t + info.offsets[:, :-1]).reshape(-1)
    lengths = info.lengths.reshape(-1)
    inside = (flat[:, None] >= start[None]) & (flat[:, None] < start[None] + lengths[None])
    inside = inside & (lengths[None] > 0)
    return jnp.where(inside.any(1), jnp.argmax(inside, axis=1) + 1, 0).reshape(b, t)


def emulated_kernel(q, k, v, q_info, kv_info, q_seg, kv_seg, scale, causal):
    """What cuDNN's packed layout computes from the tables alone (via XLA), zero on padding."""
    dq, dk = _doc(q_info, q.shape[1]), _doc(kv_info, k.shape[1])
    mask = (dq[:, :, None] == dk[:, None, :]) & (dq[:, :, None] > 0)
    if causal:
        mask = mask & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    out = layers.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla",
                                       scale=scale)
    return jnp.where((q_seg != 0)[:, :, None, None], out, 0.0)


def packed_pair(b, enc_len, dec_len, rng):
    """seqio-style packed rows: examples 1..n on both sides (lengths random), then padding."""
    enc, dec = np.zeros((b, enc_len), np.int32), np.zeros((b, dec_len), np.int32)
    for r in range(b):
        e = d = 0
        for sid in range(1, 1 + int(rng.integers(1, 5))):
            ne, nd = int(rng.integers(1, enc_len // 4)), int(rng.integers(1, dec_len // 4))
            enc[r, e:e + ne], dec[r, d:d + nd] = sid, sid
            e, d = e + ne, d + nd
    return enc, dec


@pytest.fixture
def emulated(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "uses_packed_kernel", lambda *a: True)
    monkeypatch.setattr(attention, "cudnn_packed_kernel",
                        lambda *a: calls.append(1) or emulated_kernel(*a))
    return calls


def test_pairing_needs_segments_numbered_alike():
    enc = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 3, 0]])
    dec = jnp.asarray([[1, 2, 2, 0], [1, 2, 3, 3]])
    assert bool(cross_attention.segments_paired(dec, enc))
    assert not bool(cross_attention.segments_paired(dec.at[1, 1].set(3), enc))  # 1, 3, 3, 3
    assert not bool(cross_attention.segments_paired(dec.at[0, 0].set(0), enc))  # 2 alone
    assert not bool(cross_attention.segments_paired(dec.at[1, 3].set(0), enc.at[1, 4].set(1)))


@pytest.mark.parametrize("paired", [True, False])
def test_packed_cross_attention_equals_dense_mask(emulated, paired):
    rng = np.random.default_rng(0)
    enc, dec = packed_pair(4, 48, 24, rng)
    if not paired:  # row 0 loses its last example's targets: the dense mask must be taken
        dec[0][dec[0] == dec[0].max()] = 0
    enc, dec = jnp.asarray(enc), jnp.asarray(dec)
    assert bool(cross_attention.segments_paired(dec, enc)) == paired
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (4, 24, 4, 8))
    k, v = (jax.random.normal(kk, (4, 48, 4, 8)) for kk in keys[1:3])
    w = jax.random.normal(keys[3], q.shape)
    valid = (dec != 0)[:, :, None, None]
    fast = lambda q, k, v: cross_attention.packed_cross_attention(
        q, k, v, query_segment_ids=dec, kv_segment_ids=enc, max_segments=4, scale=1.0)
    mask = layers.make_attention_mask(dec, enc)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, scale=1.0,
                                                       implementation="xla")
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v) * w, 0.0))
    np.testing.assert_allclose(jnp.where(valid, fast(q, k, v), 0), jnp.where(valid, ref(q, k, v), 0),
                               atol=1e-5)
    for a, r in zip(jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, r, atol=1e-4)
    assert emulated  # the packed branch was traced (and taken when paired)


TINY = dict(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=1,
            num_decoder_layers=2, dtype="float32", max_segments_per_row=4,
            packed_cross_attention=True)


def test_t5_packed_cross_attention_equals_dense_sharded_and_not(monkeypatch):
    rng = np.random.default_rng(1)
    b, enc_len, dec_len = 8, 32, 16
    enc, dec = packed_pair(b, enc_len, dec_len, rng)
    targets = rng.integers(2, 128, (b, dec_len)).astype(np.int32) * (dec > 0)
    batch = {"encoder_input_tokens": rng.integers(2, 128, (b, enc_len)).astype(np.int32) * (enc > 0),
             "encoder_segment_ids": enc, "decoder_segment_ids": dec,
             "decoder_input_tokens": np.roll(targets, 1, axis=1) * (dec > 0),
             "decoder_target_tokens": targets, "decoder_loss_weights": (dec > 0).astype(np.float32)}
    model = EncoderDecoderModel(config=t5.T5Config(**TINY, attention_impl="xla"))
    shapes = {k: v.shape for k, v in batch.items()}
    params = nn.unbox(jax.jit(lambda key: model.init_params(key, shapes))(jax.random.key(0)))
    step = lambda: jax.jit(lambda p, x: train_state.grads_and_metrics(model.loss_fn, p, x, None))
    want_grads, want = step()(params, batch)

    calls = []
    monkeypatch.setattr(attention, "uses_packed_kernel", lambda *a: True)
    monkeypatch.setattr(attention, "cudnn_packed_kernel",
                        lambda *a: calls.append(a[4].lengths.shape) or emulated_kernel(*a))
    got_grads, got = step()(params, batch)
    assert calls and calls[0] == (b, 4)  # cross-attention on the packed route, 4 slots a row
    off = EncoderDecoderModel(config=t5.T5Config(**dict(TINY, packed_cross_attention=False),
                                                 attention_impl="xla"))
    n = len(calls)
    jax.jit(lambda p, x: off.loss_fn(p, x, None)[0])(params, batch)
    assert len(calls) == n  # the default keeps the dense cross mask
    sharded = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    with sharded.activate():
        assert attention.batch_groups(b) == 4
        sh_grads, sh = step()(params, jax.device_put(batch, sharded.batch_sharding))
    for g, m in ((got_grads, got), (sh_grads, sh)):
        np.testing.assert_allclose(float(m["loss"]), float(want["loss"]), rtol=1e-5)
        for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-5, rtol=2e-4)
