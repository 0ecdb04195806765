"""Packed-row attention (models/attention.py): the segment table handed to cuDNN's packed kernel,
the row sort, and the decoder on that path (with the kernel emulated from the table, so the whole
route runs on CPU, sharded too). The kernel itself is checked in tests/models/test_attention_gpu.py."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zhchat.models import attention, layers
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel


def _table_mask(info, b, t):
    """The mask cuDNN's packed layout describes once jax flattens the table: the document in
    table row r with offset o and length n covers flat tokens [r * t + o, r * t + o + n); a
    token sees the earlier tokens of its document. [b, 1, t, t]."""
    lengths, offsets = np.asarray(info.lengths), np.asarray(info.offsets)
    doc = np.zeros(b * t, np.int64)
    for r in range(lengths.shape[0]):
        for o, n in zip(offsets[r], lengths[r]):
            if n < 0:
                continue
            lo = r * t + o
            assert (doc[lo:lo + n] == 0).all() and (lo // t) == ((lo + n - 1) // t)
            doc[lo:lo + n] = lo + 1
    doc = doc.reshape(b, t)
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] > 0)
    return (same & np.tril(np.ones((t, t), bool)))[:, None]


def _packing(b, t, rng, heavy_rows=()):
    rows = []
    for i in range(b):
        row, sid, pos = np.zeros(t, np.int32), 1, 0
        while pos < t - 6:
            n = int(rng.integers(2, 12) if i in heavy_rows else rng.integers(1, 60))
            row[pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def test_segment_table_shares_slots_across_rows():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 2, 2, 3, 0, 0, 0, 0]], jnp.int32)
    info = attention.segment_info(seg, 3)
    # 6 documents in 9 slots: table row 0 holds rows 0-1's, table row 1 row 2's (offsets count
    # from token 8 * table row)
    np.testing.assert_array_equal(info.lengths, [[2, 3, 8], [1, 2, 1], [-1, -1, -1]])
    np.testing.assert_array_equal(info.offsets, [[0, 2, 8, -1], [8, 9, 11, -1],
                                                 [-1, -1, -1, -1]])
    assert bool(info.fits) and not bool(info.unpacked)
    assert bool(attention.segment_info(seg, 2).fits)  # 2 + 1 + 3 <= 2 per row on every prefix
    assert not bool(attention.segment_info(seg[::-1], 2).fits)  # row 0 alone has 3
    assert bool(attention.segment_info(seg[1:2], 2).unpacked)
    np.testing.assert_array_equal(attention.documents_per_row(seg), [2, 1, 3])
    with pytest.raises(ValueError, match="max_segments"):
        attention.segment_info(seg, 1)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_segment_table_describes_the_segment_mask(groups):
    """Random packings with heavy rows (many 2-11 token documents): sorted within each group, the
    table fits 10 slots a row and allows exactly what the dense segment mask allows."""
    b, t = 8, 96
    seg = _packing(b, t, np.random.default_rng(groups), heavy_rows=(0, 5))
    assert int(attention.documents_per_row(seg)[0]) > 10
    assert not bool(attention.segment_info(seg, 10, groups=groups).fits)  # heavy row 0 first
    order = attention.sort_rows(seg, groups)
    assert order.shape == (groups, b // groups)
    sorted_seg = attention.permute_rows(seg, order)
    docs = np.asarray(attention.documents_per_row(sorted_seg)).reshape(groups, -1)
    assert (np.diff(docs, axis=1) >= 0).all()
    np.testing.assert_array_equal(attention.permute_rows(sorted_seg, attention.inverse_order(order)),
                                  seg)
    info = attention.segment_info(sorted_seg, 10, groups=groups)
    assert bool(info.fits)
    dense = np.asarray(layers.make_attention_mask(sorted_seg, sorted_seg, causal=True))
    valid = np.asarray(sorted_seg != 0)[:, None, :, None]
    np.testing.assert_array_equal(_table_mask(info, b, t), dense & valid)


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


def _emulated_kernel(q, k, v, info, segment_ids, scale, causal=True):
    """What cuDNN's packed kernel computes, from the table alone (via XLA), zero on padding."""
    b, t = segment_ids.shape
    lengths, offsets = info.lengths, info.offsets[:, :-1]
    flat = jnp.arange(b * t)
    start = (jnp.arange(b)[:, None] * t + offsets).reshape(-1)
    end = start + lengths.reshape(-1)
    inside = (flat[:, None] >= start[None]) & (flat[:, None] < end[None]) & (lengths.reshape(-1) > 0)
    doc = jnp.where(inside.any(1), jnp.argmax(inside, axis=1) + 1, 0).reshape(b, t)
    mask = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] > 0)
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    out = layers.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla",
                                       scale=scale)
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0.0)


CFG = DecoderConfig(vocab_size=64, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, dtype="float32", max_segments_per_row=8)
RULES = (("batch", ("data", "fsdp")), ("activation_batch", ("data", "fsdp")), ("embed", "fsdp"),
         ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("activation_mlp", "tensor"), ("activation_heads", "tensor"),
         ("activation_vocab", "tensor"))


def _decoder_batch(b=8, t=48):
    rng = np.random.default_rng(3)
    seg = np.asarray(_packing(b, t, rng, heavy_rows=(0, 3, 6)))
    pos = np.zeros_like(seg)
    for r in range(b):
        for s in np.unique(seg[r][seg[r] > 0]):
            idx = np.nonzero(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return {"decoder_input_tokens": jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32),
            "decoder_target_tokens": jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32),
            "decoder_segment_ids": jnp.asarray(seg), "decoder_positions": jnp.asarray(pos),
            "decoder_loss_weights": jnp.asarray(seg > 0, jnp.float32)}


def _with_prefix(batch):
    """Each segment's first tokens (0 to all but one) become prefix-LM inputs."""
    seg = np.asarray(batch["decoder_segment_ids"])
    rng, prefix = np.random.default_rng(8), np.zeros_like(seg)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            idx = np.nonzero(seg[r] == s)[0]
            prefix[r, idx[:int(rng.integers(0, len(idx)))]] = 1
    return dict(batch, decoder_causal_attention=jnp.asarray(prefix),
                decoder_loss_weights=jnp.asarray((seg > 0) & (prefix == 0), jnp.float32))


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_decoder_on_the_packed_route_equals_the_masked_one(monkeypatch, prefix_lm):
    """Sorted rows, the segment table and the row un-sort, with the kernel emulated from the
    table: loss and gradients equal the dense-mask decoder's, unsharded and on an 8-device mesh
    (groups = the 4 data-parallel shards). Prefix-LM rows run the kernel twice (bidirectional
    over the inputs' table, causal over the segments')."""
    batch = _with_prefix(_decoder_batch()) if prefix_lm else _decoder_batch()
    seg = batch["decoder_segment_ids"]
    for groups in (1, 4):  # the packed branch is the one taken, sharded or not
        order = attention.sort_rows(seg, groups)
        assert not bool(attention.segment_info(seg, 8, groups=groups).unpacked)
        assert bool(attention.segment_info(attention.permute_rows(seg, order), 8,
                                           groups=groups).fits)
    ref = DecoderOnlyModel(config=CFG)
    params = nn.unbox(ref.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
    vg = lambda m: jax.jit(jax.value_and_grad(lambda p, b: m.loss_fn(p, b, None)[0]))
    loss, grads = vg(ref)(params, batch)

    calls = []
    monkeypatch.setattr(attention, "uses_packed_kernel", lambda *a: True)
    monkeypatch.setattr(attention, "_cudnn_packed",
                        lambda *a: calls.append(a[6:] or (True,)) or _emulated_kernel(*a))
    packed = DecoderOnlyModel(config=dataclasses.replace(CFG, attention_impl="xla"))
    p_loss, p_grads = vg(packed)(params, batch)
    assert calls, "the packed branch was not traced"
    assert {c[0] for c in calls} == ({True, False} if prefix_lm else {True})  # causal or not
    np.testing.assert_allclose(p_loss, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_grads,
                           grads)

    boxed = packed.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)})
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        assert attention.batch_groups(8) == 4
        psh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        bsh = NamedSharding(mesh, P(("data", "fsdp")))
        step = jax.jit(jax.value_and_grad(lambda p, b: packed.loss_fn(p, b, None)[0]),
                       in_shardings=(psh, bsh), out_shardings=(NamedSharding(mesh, P()), psh))
        s_loss, s_grads = step(jax.device_put(params, psh), jax.device_put(batch, bsh))
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s_grads,
                           grads)
