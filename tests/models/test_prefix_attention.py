"""Prefix-LM attention split into a bidirectional call over each segment's inputs and a causal call
(models/prefix_attention.py) equals the dense prefix-LM mask, forward and backward: on XLA's
branches (one document a row, packed rows), on splash in Pallas interpret mode, and through the
whole decoder (unsharded and on 8 forced CPU devices). The cuDNN branch is pinned on the GPU
(tests/models/test_attention_gpu.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_splash import CFG, assert_splash_decoder_equals_xla
from zhchat.models import attention, layers, prefix_attention
from zhchat.models.decoder_model import DecoderOnlyModel


def prefix_rows(b, t, rng, mean_len, *, packed=True):
    """seqio PrefixLM-style rows: segments 1, 2, ... each with a leading prefix of random length
    (0 included), then padding. Returns (segment_ids, prefix, positions) as numpy."""
    seg, prefix, pos = (np.zeros((b, t), np.int32) for _ in range(3))
    for r in range(b):
        start, sid = 0, 1
        while start < t - 8 and (packed or sid == 1):
            n = min(int(rng.integers(2, 2 * mean_len)), t - 4 - start)
            seg[r, start:start + n] = sid
            prefix[r, start:start + int(rng.integers(0, n))] = 1
            pos[r, start:start + n] = np.arange(n)
            start, sid = start + n, sid + 1
    return seg, prefix, pos


def _qkv(b, t, n, kv, h):
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(kk, (b, t, kv, h)) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (b, t, n, h))


def _dense(seg, prefix):
    mask = layers.make_attention_mask(seg, seg, causal=True, query_prefix=prefix, kv_prefix=prefix)
    return lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _check(fast, ref, q, k, v, w, seg, atol):
    valid = jnp.asarray(seg != 0)[:, :, None, None]
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v) * w, 0.0))
    np.testing.assert_allclose(jnp.where(valid, fast(q, k, v), 0),
                               jnp.where(valid, ref(q, k, v), 0), atol=atol)
    g1 = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g1, g2):
        np.testing.assert_allclose(a, r, atol=atol * 5)


def test_input_ids_and_leading_prefix():
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 0, 0]])
    prefix = jnp.asarray([[1, 1, 0, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(prefix_attention.input_segment_ids(seg, prefix),
                                  [[1, 1, 0, 0, 2, 0, 0, 0], [0, 0, 2, 2, 2, 0, 0, 0]])
    assert bool(prefix_attention.prefix_leads(seg, prefix))  # padding's flag does not count
    late = prefix.at[1, 5].set(1).at[1, 4].set(0)            # an input after a target, segment 2
    assert not bool(prefix_attention.prefix_leads(seg, late))


@pytest.mark.parametrize("packed", [True, False])
def test_split_on_xla_branches_equals_dense_mask(packed):
    """Packed rows take the masked branch of both calls; one document a row the length-bounded
    bidirectional call and plain causal attention (prefixes of length 0 included)."""
    b, t = 4, 64
    seg, prefix, _ = prefix_rows(b, t, np.random.default_rng(3), 12, packed=packed)
    seg, prefix = jnp.asarray(seg), jnp.asarray(prefix)
    info = prefix_attention.prefix_info(seg, prefix, 8)
    assert bool(info.leading) and bool(info.inputs.unpacked) != packed
    assert bool(info.segments.unpacked) != packed
    q, k, v, w = _qkv(b, t, 4, 2, 16)
    fast = lambda q, k, v: prefix_attention._split(q, k, v, seg, info, "xla")
    _check(fast, _dense(seg, prefix), q, k, v, w, seg, atol=2e-5)


@pytest.mark.parametrize("leading", [True, False])
def test_prefix_lm_attention_on_splash_equals_dense_mask(leading):
    """Splash runs both calls; rows whose inputs do not lead a segment fall back to the mask."""
    b, t = 2, 128
    seg, prefix, _ = prefix_rows(b, t, np.random.default_rng(4), 30)
    if not leading:
        prefix[0, np.nonzero(seg[0] == 1)[0][-1]] = 1  # segment 1's last token is an input
        prefix[0, np.nonzero(seg[0] == 1)[0][0]] = 0
    seg, prefix = jnp.asarray(seg), jnp.asarray(prefix)
    assert bool(prefix_attention.prefix_leads(seg, prefix)) == leading
    q, k, v, w = _qkv(b, t, 4, 2, 128)
    fast = lambda q, k, v: prefix_attention.prefix_lm_attention(
        q, k, v, segment_ids=seg, prefix=prefix, implementation="splash")
    _check(fast, _dense(seg, prefix), q, k, v, w, seg, atol=2e-5)
    assert "pallas_call" in str(jax.make_jaxpr(fast)(q, k, v))


def test_decoder_prefix_lm_rows_on_splash_equal_xla_sharded_and_not():
    b, t = 8, 128
    rng = np.random.default_rng(6)
    seg, prefix, pos = prefix_rows(b, t, rng, 40)
    tokens = rng.integers(2, 64, (b, t))
    assert_splash_decoder_equals_xla({
        "decoder_input_tokens": jnp.asarray(tokens, jnp.int32),
        "decoder_target_tokens": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
        "decoder_segment_ids": jnp.asarray(seg), "decoder_positions": jnp.asarray(pos),
        "decoder_causal_attention": jnp.asarray(prefix),
        "decoder_loss_weights": jnp.asarray((seg > 0) & (prefix == 0), jnp.float32)})


def test_decoder_prefix_rows_without_segment_ids_equal_xla():
    """Unpacked prefix-LM rows (no segment ids: every token one segment) through splash."""
    b, t = 2, 128
    rng = np.random.default_rng(7)
    prefix = (np.arange(t)[None, :] < np.array([[50], [0]])).astype(np.int32)
    tokens = jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32)
    ref = DecoderOnlyModel(config=dataclasses.replace(CFG, attention_impl="xla"))
    fast = DecoderOnlyModel(config=dataclasses.replace(CFG, attention_impl="splash"))
    params = nn.unbox(ref.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
    run = lambda m: m.module.apply({"params": params}, tokens, prefix=jnp.asarray(prefix))
    np.testing.assert_allclose(run(fast), run(ref), atol=1e-4)
    assert attention.batch_groups(b) == 1
