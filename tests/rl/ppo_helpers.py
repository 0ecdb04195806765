"""A toy PPO setup shared by the PPO tests: reward = number of TARGET tokens in the response."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from rl_helpers import TARGET, VOCAB, tiny_decoder, tiny_t5
from zhchat.rl import kl_controller, ppo, ppo_step, reward_model
from zhchat.trainer import partitioning


def count_target(prompts, responses, mask):
    return jnp.sum((responses == TARGET) * mask, axis=1).astype(jnp.float32)


def prompts(batch_size, seed, shard_index, shard_count):
    rng = np.random.default_rng(seed)
    while True:
        yield {"prompt_tokens": rng.integers(8, VOCAB, size=(batch_size, 6)).astype(np.int32)}


def run(arch: str, *, iterations: int, num_devices: int = 1, batch_size: int = 16, run_dir=None,
        kl_coef: float = 0.05, lr: float = 3e-3, kl_target: float | None = None,
        prompt_source=prompts, **cfg_kwargs):
    policy = tiny_t5() if arch == "t5" else tiny_decoder()
    critic = reward_model.RewardModel(backbone=policy, head_init_scale=0.0)
    cfg = ppo_step.PPOConfig(**{"max_decode_length": 8, "ppo_epochs": 2, "num_minibatches": 2,
                                **cfg_kwargs})
    return ppo.train_ppo(policy=policy, critic=critic, prompts=prompt_source, reward_fn=count_target,
                         config=cfg, kl=kl_controller.KLController(
                             init_coef=kl_coef, adaptive=kl_target is not None, target=kl_target or 1.0,
                             horizon=40),
                         partitioner=partitioning.Partitioner(num_devices=num_devices),
                         policy_optimizer=optax.adam(lr), critic_optimizer=optax.adam(lr),
                         num_iterations=iterations, batch_size=batch_size, run_dir=run_dir,
                         checkpoint_every=2, progress_bar=False)
