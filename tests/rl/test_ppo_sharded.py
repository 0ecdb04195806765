"""One PPO iteration on 8 CPU devices equals the unsharded one (fixed seeds)."""

from __future__ import annotations

import jax
import numpy as np

from ppo_helpers import run


def test_ppo_sharded_equals_unsharded():
    one = run("decoder", iterations=1, num_devices=1)
    eight = run("decoder", iterations=1, num_devices=8)
    assert len(jax.tree.leaves(eight["policy_state"].params)[0].sharding.device_set) == 8
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "approx_kl",
                "clip_fraction", "response_length"):
        np.testing.assert_allclose(one["history"][0][key], eight["history"][0][key], rtol=2e-4,
                                   atol=2e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(one["policy_state"].params),
                    jax.tree.leaves(eight["policy_state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(one["critic_state"].params),
                    jax.tree.leaves(eight["critic_state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
