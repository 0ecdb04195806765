"""rl/roles.py: the actor, critic, reference and reward as named parts on one mesh. The critic
starts from the reward model's parameters when they fit; the reference is a frozen copy that a
later actor update does not touch; the reward's parameters are placed by their logical axes."""

import flax.linen as nn
import jax
import numpy as np

from rl_helpers import tiny_decoder
from zhchat.rl import reward_model, roles
from zhchat.trainer import optimizers, partitioning


def test_roles():
    part = partitioning.Partitioner(mesh_shape=(2, 2, 2))
    policy = tiny_decoder()
    critic_model = reward_model.RewardModel(backbone=policy, head_init_scale=0.0)
    shapes = roles.response_shapes(policy, 6, 8)
    assert shapes == {"decoder_input_tokens": (1, 14)}
    tx = optimizers.make_optimizer(learning_rate=1e-2)
    actor = roles.actor(policy, tx, part, shapes, jax.random.key(0))
    ref = roles.reference(actor)
    assert (actor.role, ref.role) == (roles.Role.ACTOR, roles.Role.REFERENCE)

    rm_params = nn.unbox(critic_model.init_params(jax.random.key(5), shapes))
    value = roles.critic(critic_model, tx, part, shapes, jax.random.key(1), None, rm_params)
    for a, b in zip(jax.tree.leaves(value.state.params), jax.tree.leaves(rm_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the critic starts as the RM
    fresh = roles.critic(critic_model, tx, part, shapes, jax.random.key(1))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(fresh.state.params), jax.tree.leaves(rm_params)))

    judge = roles.reward(critic_model, rm_params, part, shapes, jax.random.key(2))
    assert judge.role == roles.Role.REWARD
    assert all(x.sharding.mesh.shape == part.mesh.shape for x in jax.tree.leaves(judge.params))

    # an actor update leaves the reference where it started
    grads = jax.tree.map(np.ones_like, actor.state.params)
    with part.activate():
        moved = jax.jit(lambda s, g: s.apply_gradients(g))(actor.state, grads)
    before = jax.tree.leaves(ref.params)
    after_actor = jax.tree.leaves(moved.params)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after_actor))
    for a, b in zip(before, jax.tree.leaves(actor.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert roles.reward(critic_model, None, part, {}, jax.random.key(2)).params is None
