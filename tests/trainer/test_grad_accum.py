"""Gradient accumulation over k microbatches equals one big batch (grads, loss, metrics)."""

import flax.linen as nn
import jax
import numpy as np

from conftest import random_batch
import optax

from zhchat.trainer import partitioning, synthetic_data, train, train_state


def test_microbatches_match_big_batch(model):
    batch = random_batch(8, 16, 64, seed=3)
    batch["decoder_loss_weights"][1, :9] = 0.0  # uneven token counts across microbatches
    batch["decoder_loss_weights"][6, :] = 0.0
    shapes = {k: v.shape for k, v in batch.items()}
    params = jax.jit(lambda k: nn.unbox(model.init_params(k, shapes)))(jax.random.key(0))
    fn = jax.jit(lambda p, b, k: train_state.grads_and_metrics(model.loss_fn, p, b, None, k),
                 static_argnums=2)
    big_grads, big = fn(params, batch, 1)
    for k in (4,):
        grads, metrics = fn(params, batch, k)
        for name in ("loss", "accuracy", "z_loss", "num_tokens"):
            np.testing.assert_allclose(float(metrics[name]), float(big[name]), atol=1e-5,
                                       err_msg=f"{name} with {k} microbatches")
        for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(big_grads)):
            assert g.dtype == np.float32
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-5)


def test_train_with_microbatches_on_a_mesh_matches(model):
    sgd = optax.sgd(0.5)  # plain SGD: parameter differences stay proportional to gradients

    def run(microbatches):
        return train.train(
            model=model, partitioner=partitioning.Partitioner(mesh_shape=(2, 2, 2)),
            train_data=lambda **kw: synthetic_data.make_synthetic_iterator(
                seq_len=16, vocab_size=64, **kw),
            optimizer=sgd, num_steps=3,
            batch_size=16, microbatches=microbatches, log_every=1, progress_bar=False)
    one, two = run(1), run(2)
    assert [h["step"] for h in two["history"]] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in two["history"]],
                               [h["loss"] for h in one["history"]], atol=1e-5)
    for a, b in zip(jax.tree.leaves(one["state"].params), jax.tree.leaves(two["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
