"""Mesh shapes, logical rules -> shardings, and sharded == unsharded loss and gradients."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_batch
from zhchat.trainer import optimizers, partitioning, state_init, train_state


def test_resolve_mesh_shape():
    assert partitioning.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert partitioning.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert partitioning.resolve_mesh_shape((1, 1, 1), 1) == (1, 1, 1)
    for bad in [(-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, 1, 1)]:
        with pytest.raises(ValueError, match="mesh_shape"):
            partitioning.resolve_mesh_shape(bad, 8)


def test_mesh_axes_and_rule_overrides():
    part = partitioning.Partitioner(mesh_shape=(2, 2, 2), extra_rules=[("embed", "tensor")])
    assert dict(part.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert part.data_parallel_size == 4
    # the override wins; `mlp` then finds `tensor` taken within this array and stays replicated
    assert part.rules[0] == ("embed", "tensor")
    assert part.mesh_spec(P("embed", "mlp"), (8, 8)) == (P("tensor", None), [])
    default = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    assert default.mesh_spec(P("embed", "mlp"), (8, 8))[0] == P("fsdp", "tensor")
    # an axis that does not divide the dimension is dropped (replicated) and reported
    spec, dropped = default.mesh_spec(P("vocab", "embed"), (5, 8))
    assert spec == P(None, "fsdp") and dropped == ["tensor (dim 5)"]


def test_param_and_optimizer_state_shardings(model):
    part = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    shapes = {k: (8, 16) for k in random_batch(8, 16, 64)}
    for name in ("adamw", "adafactor"):
        tx = optimizers.make_optimizer(name=name, learning_rate=1e-3)
        init = state_init.StateInitializer(model, tx, part, shapes, jax.random.key(0))
        boxed, state_sh = init.boxed, init.shardings
        specs = jax.tree.leaves(part.logical_specs(boxed), is_leaf=lambda x: isinstance(x, P))
        assert specs and all(len(s) > 0 for s in specs), "every parameter has logical axes"
        params_sh = jax.tree.leaves(state_sh.params)
        assert any("tensor" in str(s.spec) for s in params_sh)
        assert any("fsdp" in str(s.spec) for s in params_sh)
        opt_sh = jax.tree.leaves(state_sh.opt_state)
        # moments / factored statistics follow their parameters' shardings
        assert sum("fsdp" in str(s.spec) or "tensor" in str(s.spec) for s in opt_sh) >= len(
            params_sh)


def _loss_and_grads(model, params, batch, part):
    with part.activate():
        fn = jax.jit(lambda p, b: train_state.grads_and_metrics(model.loss_fn, p, b, None))
        return fn(params, batch)


def test_sharded_equals_unsharded(model):
    batch = random_batch(8, 32, 64, seed=1)
    shapes = {k: v.shape for k, v in batch.items()}
    tx = optimizers.make_optimizer(learning_rate=1e-3)
    single = partitioning.Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    boxed = state_init.StateInitializer(model, tx, single, shapes, jax.random.key(0)).boxed
    with single.activate():
        params = jax.jit(lambda k: nn.unbox(model.init_params(k, shapes)))(jax.random.key(0))
    grads1, metrics1 = _loss_and_grads(model, params, batch, single)

    sharded = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    params_sh = sharded.shardings(boxed)
    params8 = jax.device_put(params, params_sh)
    batch8 = jax.device_put(batch, sharded.batch_sharding)
    grads8, metrics8 = _loss_and_grads(model, params8, batch8, sharded)
    assert len(jax.tree.leaves(grads8)[0].sharding.device_set) == 8
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), atol=1e-5)
    for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), atol=1e-5)
