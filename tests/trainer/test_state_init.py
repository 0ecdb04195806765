"""StateInitializer: the one way a train state is built (fresh, restored, from given params)."""

import jax
import numpy as np
import pytest

from conftest import random_batch
from zhchat.rl.reward_model import RewardModel
from zhchat.trainer import checkpoints, optimizers, partitioning, state_init


def _init(model, part, shapes):
    return state_init.StateInitializer(model, optimizers.make_optimizer(learning_rate=1e-3), part,
                                       shapes, jax.random.key(0))


def test_fresh_state_is_sharded_by_logical_axes_and_equals_an_unsharded_init(model):
    shapes = {k: (8, 16) for k in random_batch(8, 16, 64)}
    sharded = _init(model, partitioning.Partitioner(mesh_shape=(2, 2, 2)), shapes)
    state = sharded.init()
    assert int(state.step) == 0
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(sharded.shardings)):
        assert got.sharding == want
    assert any("tensor" in str(s.spec) for s in jax.tree.leaves(sharded.shardings.params))
    single = _init(model, partitioning.Partitioner(mesh_shape=(1, 1, 1),
                                                   devices=jax.devices()[:1]), shapes)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.init().params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sharded.num_params == sum(x.size for x in jax.tree.leaves(state.params))


def test_from_params_keeps_them_with_a_fresh_optimizer_and_checks_shapes(model, tmp_path):
    shapes = {k: (8, 16) for k in random_batch(8, 16, 64)}
    part = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    init = _init(model, part, shapes)
    trained = jax.tree.map(lambda x: x + 1.0, init.init().params)
    state = init.from_params(trained)
    assert int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu = jax.tree.leaves(state.opt_state)
    assert all(float(np.abs(np.asarray(m)).max()) == 0.0 for m in mu if np.ndim(m) > 0)
    with pytest.raises(ValueError, match="do not match"):
        init.from_params(jax.tree.map(lambda x: x[..., :1], trained))

    # under a subtree: a reward model's backbone from the policy's parameters
    rm = RewardModel(backbone=model)
    rm_init = _init(rm, part, {"decoder_input_tokens": (1, 16)})
    rm_state = rm_init.from_params(trained, subtree="backbone")
    for a, b in zip(jax.tree.leaves(rm_state.params["backbone"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(rm_state.params) == {"backbone", "head"}

    # round trip through a checkpoint and `params_from_checkpoint`
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    with part.activate():
        ckpt.save(0, state, None, force=True)
    restored, _, step = init.restore(ckpt)
    params, at = init.params_from_checkpoint(str(tmp_path))
    assert step == at == 0
    for tree in (restored.params, params):
        for a, b, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(trained),
                            jax.tree.leaves(init.shardings.params)):
            assert a.sharding == sh
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()
