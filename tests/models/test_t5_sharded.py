"""The tiny T5 under the trainer's partitioner: sharded (2x2x2 mesh of 8 CPU devices) == unsharded
loss and gradients, on a packed batch (segment ids on both sides)."""

import flax.linen as nn
import jax
import numpy as np

from zhchat.models import t5
from zhchat.models.encdec_model import EncoderDecoderModel
from zhchat.trainer import optimizers, partitioning, state_init, train_state


def test_sharded_equals_unsharded():
    cfg = t5.T5Config(vocab_size=256, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                      num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
    model = EncoderDecoderModel(config=cfg)
    rng = np.random.default_rng(0)
    b, enc_len, dec_len = 8, 16, 8
    enc_seg = np.repeat(np.array([[1] * 7 + [2] * 6 + [0] * 3]), b, 0).astype(np.int32)
    dec_seg = np.repeat(np.array([[1] * 4 + [2] * 3 + [0]]), b, 0).astype(np.int32)
    targets = rng.integers(2, 256, size=(b, dec_len)).astype(np.int32) * (dec_seg > 0)
    starts = np.concatenate([np.ones((b, 1), bool), dec_seg[:, 1:] != dec_seg[:, :-1]], axis=1)
    dec_in = np.where(starts, 0, np.roll(targets, 1, axis=1)).astype(np.int32)  # BOS per segment
    batch = {"encoder_input_tokens": rng.integers(2, 256, size=(b, enc_len)).astype(np.int32) * (enc_seg > 0),
             "encoder_segment_ids": enc_seg, "decoder_segment_ids": dec_seg,
             "decoder_input_tokens": dec_in * (dec_seg > 0), "decoder_target_tokens": targets,
             "decoder_loss_weights": (dec_seg > 0).astype(np.float32)}
    shapes = {k: v.shape for k, v in batch.items()}
    tx = optimizers.make_optimizer(learning_rate=1e-3)

    def loss_and_grads(params, batch, part):
        with part.activate():
            fn = jax.jit(lambda p, x: train_state.grads_and_metrics(model.loss_fn, p, x, None))
            return fn(params, batch)

    single = partitioning.Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    boxed = state_init.StateInitializer(model, tx, single, shapes, jax.random.key(0)).boxed
    with single.activate():
        params = jax.jit(lambda k: nn.unbox(model.init_params(k, shapes)))(jax.random.key(0))
    grads1, metrics1 = loss_and_grads(params, batch, single)

    sharded = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    params_sh = sharded.shardings(boxed)
    specs = {str(s.spec) for s in jax.tree.leaves(params_sh)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
    params8 = jax.device_put(params, params_sh)
    batch8 = jax.device_put(batch, sharded.batch_sharding)
    grads8, metrics8 = loss_and_grads(params8, batch8, sharded)
    assert len(jax.tree.leaves(grads8)[0].sharding.device_set) == 8
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
    for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), atol=1e-5, rtol=1e-4)
