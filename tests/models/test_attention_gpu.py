"""GPU-only: cuDNN's packed flash attention (models/attention.py) equals the masked XLA reference,
forward and backward, in bf16 (skipped without a Hopper GPU); so does prefix-LM attention through
it (models/prefix_attention.py).

Marked `gpu`: on the GPU machine all GPU tests run with
`JAX_PLATFORMS=cuda python -m pytest -m gpu tests` (docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import attention, layers, prefix_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not attention.cudnn_packed_available(),
                                 reason="needs a Hopper GPU (cuDNN packed attention)")]


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


def _prefixes(seg, rng):
    """A leading prefix of random length (0 included) in each segment of `seg`."""
    seg = np.asarray(seg)
    prefix = np.zeros_like(seg)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            idx = np.nonzero(seg[r] == s)[0]
            prefix[r, idx[:int(rng.integers(0, len(idx)))]] = 1
    return jnp.asarray(prefix)


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


def _assert_attention_agrees(fast, ref, q, k, v, seg):
    """bf16 outputs within 2e-2 and q, k, v gradients within 2% (relative norm) of `ref` on the
    non-padding queries; returns the reference's (masked) outputs."""
    (o1, g1), (o2, g2) = _loss_and_grads(fast, q, k, v, seg), _loss_and_grads(ref, q, k, v, seg)
    np.testing.assert_allclose(o1, o2, atol=2e-2)
    for a, r in zip(g1, g2):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.linalg.norm(a - r) <= 2e-2 * np.linalg.norm(r), np.abs(a - r).max()
    return o2


@pytest.mark.parametrize("mean_len,max_segments,heads", [(300, 16, (8, 2, 64)),
                                                         (40, 32, (8, 8, 128)),
                                                         (20, 8, (4, 1, 64))])
def test_packed_cudnn_equals_masked_xla(mean_len, max_segments, heads):
    """Short and long documents, GQA and MHA, and (mean 20, 8 slots) a batch with more documents
    than table slots, which must take the masked path and still be right."""
    b, t = 4, 1024
    seg = _packing(b, t, np.random.default_rng(mean_len), mean_len)
    q, k, v = _qkv(b, t, *heads)
    fits = bool(attention.segment_info(seg, max_segments).fits)
    assert fits == (mean_len > 20)
    fast = lambda q, k, v: attention.packed_causal_attention(
        q, k, v, segment_ids=seg, implementation="cudnn", max_segments=max_segments)
    mask = layers.make_attention_mask(seg, seg, causal=True)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    _assert_attention_agrees(fast, ref, q, k, v, seg)


@pytest.mark.parametrize("mean_len,max_segments,heads", [
    (300, 16, (8, 2, 64)), (40, 32, (8, 8, 128)), (None, 16, (4, 1, 64)), (20, 8, (4, 2, 64))])
def test_prefix_lm_through_cudnn_equals_masked_xla(mean_len, max_segments, heads):
    """Packed prefix-LM rows (both calls on the packed layout), rows of one document each (None:
    the length-bounded bidirectional call and plain causal attention), and (mean 20, 8 slots)
    more documents than table slots: the dense prefix-LM mask."""
    b, t = 4, 1024
    rng = np.random.default_rng(11)
    if mean_len is None:
        seg = jnp.asarray((np.arange(t)[None, :] < rng.integers(100, t, (b, 1))).astype(np.int32))
    else:
        seg = _packing(b, t, rng, mean_len)
    prefix = _prefixes(seg, rng)
    info = prefix_attention.prefix_info(seg, prefix, max_segments)
    assert bool(info.leading) and bool(info.inputs.unpacked) == (mean_len is None)
    fits = attention.table_fits(info.segments) & attention.table_fits(info.inputs)
    assert bool(fits) == (mean_len != 20)
    q, k, v = _qkv(b, t, *heads, seed=5)
    fast = lambda q, k, v: prefix_attention.prefix_lm_attention(
        q, k, v, segment_ids=seg, prefix=prefix, implementation="cudnn",
        max_segments=max_segments)
    mask = layers.make_attention_mask(seg, seg, causal=True, query_prefix=prefix, kv_prefix=prefix)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    _assert_attention_agrees(fast, ref, q, k, v, seg)
    assert "cudnn" in jax.jit(fast).lower(q, k, v).as_text().lower()


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


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_decoder_with_sorted_packed_rows_matches_xla(prefix_lm):
    """The decoder's whole packed route on the GPU (row sort, table, kernel, un-sort) against the
    dense-mask XLA decoder, on rows with a long tail of short documents; prefix-LM rows too."""
    import dataclasses

    import flax.linen as nn

    from zhchat.models.decoder import DecoderConfig
    from zhchat.models.decoder_model import DecoderOnlyModel

    cfg = DecoderConfig(vocab_size=256, emb_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=64, mlp_dim=512, dtype="bfloat16", max_segments_per_row=12)
    rng = np.random.default_rng(5)
    b, t = 8, 512
    seg = np.array(_packing(b, t, rng, 200))
    seg[0] = np.asarray(_packing(1, t, rng, 8))[0]  # one row of ~60 short documents, first
    pos = np.zeros_like(seg)
    for r in range(b):
        for s_id in np.unique(seg[r][seg[r] > 0]):
            idx = np.nonzero(seg[r] == s_id)[0]
            pos[r, idx] = np.arange(len(idx))
    seg = jnp.asarray(seg)
    assert not bool(attention.segment_info(seg, 12).fits)
    assert bool(attention.segment_info(attention.permute_rows(seg, attention.sort_rows(seg, 1)),
                                       12).fits)
    batch = {"decoder_input_tokens": jnp.asarray(rng.integers(2, 256, (b, t)), jnp.int32),
             "decoder_target_tokens": jnp.asarray(rng.integers(2, 256, (b, t)), jnp.int32),
             "decoder_segment_ids": seg, "decoder_positions": jnp.asarray(pos),
             "decoder_loss_weights": jnp.asarray(seg > 0, jnp.float32)}
    if prefix_lm:
        batch["decoder_causal_attention"] = prefix = _prefixes(seg, rng)
        batch["decoder_loss_weights"] = jnp.asarray((seg > 0) & (prefix == 0), jnp.float32)
    fast = DecoderOnlyModel(config=cfg)
    ref = DecoderOnlyModel(config=dataclasses.replace(cfg, attention_impl="xla"))
    params = nn.unbox(fast.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
    _assert_models_agree(fast, ref, params, batch)


def _assert_models_agree(fast, ref, params, batch):
    """bf16 loss within 1% and every gradient within 3% (relative norm) of the reference."""
    vg = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))
    (l1, g1), (l2, g2) = vg(fast)(params), vg(ref)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-2)
    for a, r in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(a).all()
        assert np.linalg.norm(a - r) <= 3e-2 * np.linalg.norm(r) + 1e-6


def _pairs(b, enc_len, dec_len, rng, examples=(1, 4)):
    """seqio-style packed encoder/decoder rows: examples 1..n on both sides, then padding."""
    enc, dec = np.zeros((b, enc_len), np.int32), np.zeros((b, dec_len), np.int32)
    for r in range(b):
        e = d = 0
        for sid in range(1, 1 + int(rng.integers(*examples))):
            ne, nd = int(rng.integers(8, enc_len // 4)), int(rng.integers(2, dec_len // 4))
            enc[r, e:e + ne], dec[r, d:d + nd] = sid, sid
            e, d = e + ne, d + nd
    return jnp.asarray(enc), jnp.asarray(dec)


def test_packed_cross_attention_through_cudnn_equals_masked_xla():
    """T5-large's cross-attention shapes (114 decoder over 512 encoder positions, 16 heads of
    64, no logit scaling) on packed rows, forward and backward."""
    from zhchat.models import cross_attention

    b = 8
    enc, dec = _pairs(b, 512, 114, np.random.default_rng(2))
    info = cross_attention.cross_info(dec, enc, 16)
    assert bool(info.paired) and bool(info.queries.fits)
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    q = (jax.random.normal(keys[0], (b, 114, 16, 64)) * 0.125).astype(jnp.bfloat16)
    k, v = (jax.random.normal(kk, (b, 512, 16, 64), jnp.bfloat16) for kk in keys[1:])
    fast = lambda q, k, v: cross_attention.packed_cross_attention(
        q, k, v, query_segment_ids=dec, kv_segment_ids=enc, info=info, implementation="cudnn",
        scale=1.0)
    mask = layers.make_attention_mask(dec, enc)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, scale=1.0,
                                                       implementation="xla")
    o2 = _assert_attention_agrees(fast, ref, q, k, v, dec)
    alone = jax.jit(lambda q, k, v: attention.cudnn_packed_kernel(  # the kernel, no dispatch
        q, k, v, info.queries, info.keys, dec, enc, 1.0, False))(q, k, v)
    np.testing.assert_allclose(np.asarray(alone, np.float32), o2, atol=2e-2)


def test_t5_on_packed_rows_matches_xla():
    """The tiny T5 in bf16 on packed rows: "auto" with packed_cross_attention (cuDNN's packed
    layout) against XLA's dense masks, loss and gradients."""
    import dataclasses

    import flax.linen as nn

    from zhchat.models import t5
    from zhchat.models.encdec_model import EncoderDecoderModel

    cfg = t5.T5Config(vocab_size=256, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                      num_encoder_layers=2, num_decoder_layers=2, dtype="bfloat16",
                      packed_cross_attention=True)
    rng = np.random.default_rng(3)
    b, enc_len, dec_len = 8, 256, 64
    enc, dec = _pairs(b, enc_len, dec_len, rng)
    targets = jnp.asarray(rng.integers(2, 256, (b, dec_len)), jnp.int32) * (dec > 0)
    batch = {"encoder_input_tokens": jnp.asarray(rng.integers(2, 256, (b, enc_len)),
                                                 jnp.int32) * (enc > 0),
             "encoder_segment_ids": enc, "decoder_segment_ids": dec,
             "decoder_input_tokens": jnp.roll(targets, 1, axis=1) * (dec > 0),
             "decoder_target_tokens": targets,
             "decoder_loss_weights": (dec > 0).astype(jnp.float32)}
    fast = EncoderDecoderModel(config=cfg)
    ref = EncoderDecoderModel(config=dataclasses.replace(cfg, attention_impl="xla"))
    shapes = {k: v.shape for k, v in batch.items()}
    params = nn.unbox(jax.jit(lambda key: fast.init_params(key, shapes))(jax.random.key(0)))
    _assert_models_agree(fast, ref, params, batch)
