"""T5 with attention_impl="pallas" (self-attention through the bucket kernel, Pallas interpret mode
on CPU) equals the same parameters on XLA's dense bias and mask: loss and every gradient, packed
and unpacked batches, and under the trainer's 2x2x2 mesh (the kernel inside shard_map)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from zhchat.models import t5
from zhchat.models.encdec_model import EncoderDecoderModel
from zhchat.trainer import optimizers, partitioning, state_init, train_state

TINY = dict(vocab_size=128, d_model=32, num_heads=4, head_dim=16, d_ff=64, num_encoder_layers=2,
            num_decoder_layers=2, dtype="float32", relpos_buckets=8, relpos_max_distance=16)


def _batch(b, packed, seed=0):
    rng = np.random.default_rng(seed)
    enc_len, dec_len = 40, 24
    if packed:
        enc_seg = np.repeat(np.array([[1] * 17 + [2] * 15 + [0] * 8]), b, 0).astype(np.int32)
        dec_seg = np.repeat(np.array([[1] * 11 + [2] * 9 + [0] * 4]), b, 0).astype(np.int32)
    else:
        enc_seg = (np.arange(enc_len)[None] < rng.integers(10, enc_len, (b, 1))).astype(np.int32)
        dec_seg = (np.arange(dec_len)[None] < rng.integers(5, dec_len, (b, 1))).astype(np.int32)
    targets = rng.integers(2, 128, size=(b, dec_len)).astype(np.int32) * (dec_seg > 0)
    starts = np.concatenate([np.ones((b, 1), bool), dec_seg[:, 1:] != dec_seg[:, :-1]], axis=1)
    dec_in = np.where(starts, 0, np.roll(targets, 1, axis=1)).astype(np.int32) * (dec_seg > 0)
    batch = {"encoder_input_tokens": rng.integers(2, 128, (b, enc_len)).astype(np.int32) * (enc_seg > 0),
             "decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
             "decoder_loss_weights": (dec_seg > 0).astype(np.float32)}
    if packed:
        batch.update(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    return batch


def _grads(impl, params, batch, part=None):
    model = EncoderDecoderModel(config=t5.T5Config(**TINY, attention_impl=impl))
    fn = jax.jit(lambda p, x: train_state.grads_and_metrics(model.loss_fn, p, x, None))
    if part is None:
        return fn(params, batch)
    with part.activate():
        return fn(params, batch)


def _params(batch):
    model = EncoderDecoderModel(config=t5.T5Config(**TINY))
    shapes = {k: v.shape for k, v in batch.items()}
    return model, nn.unbox(jax.jit(lambda k: model.init_params(k, shapes))(jax.random.key(0)))


def _assert_same(got, want):
    (g1, m1), (g2, m2) = got, want
    assert np.isfinite(float(m2["loss"]))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)
    for (path, a), e in zip(flat1, flat2):
        assert np.all(np.isfinite(e)), jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-5, rtol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("packed", [True, False])
def test_bucket_kernel_equals_dense_bias(packed):
    batch = _batch(2, packed)
    _, params = _params(batch)
    got = _grads("pallas", params, batch)
    _assert_same(got, _grads("xla", params, batch))
    relpos = got[0]["encoder_relpos"]["rel_embedding"]
    assert float(np.abs(relpos).max()) > 1e-4   # the table is trained through the kernel


def test_bucket_kernel_sharded_equals_unsharded():
    batch = _batch(8, packed=True, seed=1)
    _, params = _params(batch)
    want = _grads("xla", params, batch)
    sharded = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    model = EncoderDecoderModel(config=t5.T5Config(**TINY))
    boxed = state_init.StateInitializer(model, optimizers.make_optimizer(learning_rate=1e-3),
                                        sharded, {k: v.shape for k, v in batch.items()},
                                        jax.random.key(0)).boxed
    params8 = jax.device_put(params, sharded.shardings(boxed))
    batch8 = jax.device_put(batch, sharded.batch_sharding)
    got = _grads("pallas", params8, batch8, sharded)
    assert len(jax.tree.leaves(got[0])[0].sharding.device_set) == 8
    _assert_same(got, want)


def test_pallas_falls_back_where_the_kernel_cannot_run_and_bad_names_are_rejected():
    """A head dim the kernel cannot tile runs the dense path (same loss as XLA, said once in the
    log); an unknown implementation is a config error."""
    batch = _batch(2, packed=True)
    shapes = {k: v.shape for k, v in batch.items()}
    cfg = {**TINY, "head_dim": 24}
    losses = []
    for impl in ("pallas", "xla"):
        model = EncoderDecoderModel(config=t5.T5Config(**cfg, attention_impl=impl))
        params = nn.unbox(jax.jit(lambda k: model.init_params(k, shapes))(jax.random.key(0)))
        losses.append(float(jax.jit(model.loss_fn)(params, batch, None)[0]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    with pytest.raises(ValueError, match="attention_impl"):
        t5.T5Config(attention_impl="flash")
