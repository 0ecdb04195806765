"""The PPO learner: one iteration over the four roles (rl/roles.py), as a reusable part.

An iteration: prompts -> responses (the actor through the jitted KV-cache sampler) -> scores (the
reward model or function) -> experience (rl/ppo_step.py: log-probs, the reference's log-probs,
values, KL-shaped rewards, GAE) -> `ppo_epochs` epochs of minibatch updates of the actor and the
critic (stopping early once approx-KL passes `target_kl_early_stop`) -> the KL-coefficient update.
The learner holds what a checkpoint must carry (actor and critic states, reward statistics, the
KL coefficient); rl/ppo.py runs it with the trainer's checkpoint, metrics and fault pieces.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from zhchat.rl import kl_controller, ppo_step, roles, rollout
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import metrics as metrics_lib
from zhchat.trainer import partitioning


def running_stats(stats: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Chan et al.'s merge of (count, mean, M2) with a batch of scores."""
    n, mean, m2 = stats
    b = scores.size
    b_mean, b_m2 = float(scores.mean()), float(((scores - scores.mean()) ** 2).sum())
    total = n + b
    delta = b_mean - mean
    return np.array([total, mean + delta * b / total, m2 + b_m2 + delta ** 2 * n * b / total])


class PPOLearner:
    """PPO over an actor and critic (trained) and a reference and reward (frozen) on one mesh."""

    def __init__(self, *, actor: roles.Trained, critic: roles.Trained, reference: roles.Frozen,
                 reward: roles.Frozen, reward_fn: Callable | None, cfg: ppo_step.PPOConfig,
                 kl: kl_controller.KLController, partitioner: partitioning.Partitioner,
                 batch_size: int, prompt_len: int, seed: int):
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward
        self.cfg, self.kl, self.partitioner, self.seed = cfg, kl, partitioner, seed
        self.batch_size, self.prompt_len = batch_size, prompt_len
        self.stats = np.array([0.0, 0.0, 0.0])  # reward (count, mean, M2): score whitening
        self.sample_rng = jax.random.split(jax.random.key(seed), 3)[2]
        batch_sh, rep = partitioner.batch_sharding, partitioner.replicated
        policy, value_model = actor.model, critic.model
        self._score = jax.jit(functools.partial(
            ppo_step.scores, eos_id=policy.eos_id, reward_model=reward.model,
            reward_fn=reward_fn), out_shardings=rep)
        self._experience = jax.jit(functools.partial(
            ppo_step.experience, cfg=cfg, policy=policy, critic=value_model),
            out_shardings=(batch_sh, rep))
        constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sh)
        self._epoch = jax.jit(functools.partial(
            ppo_step.train_epoch, cfg=cfg, policy=policy, critic=value_model,
            constrain=constrain), out_shardings=(actor.shardings, critic.shardings, rep),
            donate_argnums=(0, 1))

    # -- what a checkpoint carries -------------------------------------------------------------
    def state_tree(self) -> dict[str, Any]:
        return {"policy": self.actor.state, "critic": self.critic.state}

    def data(self) -> dict[str, Any]:
        return {"reward_stats": self.stats.tolist(), "kl_coef": self.kl.value}

    def restore(self, checkpointer: ckpt_lib.Checkpointer) -> tuple[int, Any]:
        """Loads the newest checkpoint; returns (iterations done, the saved prompt position)."""
        tree = self.state_tree()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        restored, data, start = checkpointer.restore(abstract)
        self.actor.state, self.critic.state = restored["policy"], restored["critic"]
        self.stats, self.kl.value = np.asarray(data["reward_stats"]), float(data["kl_coef"])
        return start, data.get("prompt_state")

    # -- one iteration ---------------------------------------------------------------------------
    def iteration(self, it: int, prompts: np.ndarray,
                  next_ptx: Callable[[], dict] | None = None) -> dict[str, float]:
        """Runs iteration `it` on a [batch, prompt_len] array of prompts; returns its metrics.
        `next_ptx()`: the next epoch's pretraining batches stacked per minibatch (InstructGPT's
        PPO-ptx), drawn only for the epochs that run; None without PPO-ptx."""
        cfg, policy, batch_sh = self.cfg, self.actor.model, self.partitioner.batch_sharding
        prompts_dev = jax.device_put(
            np.asarray(rollout.left_pad(jnp.asarray(prompts), policy.pad_id)), batch_sh)
        t0 = time.perf_counter()
        responses = rollout.generate(policy, self.actor.state.params, prompts_dev,
                                     jax.random.fold_in(self.sample_rng, it),
                                     max_decode_length=cfg.max_decode_length,
                                     temperature=cfg.temperature, top_k=cfg.top_k,
                                     top_p=cfg.top_p)
        responses = jax.block_until_ready(jax.device_put(responses, batch_sh))
        t_rollout = time.perf_counter() - t0

        score = self._score(self.reward.params, prompts_dev, responses)
        self.stats = running_stats(self.stats, np.asarray(jax.device_get(score), np.float64))
        std = float(np.sqrt(self.stats[2] / self.stats[0])) if self.stats[0] > 1 else 1.0
        exp, roll = self._experience(
            self.actor.state.params, self.reference.params, self.critic.state.params,
            prompts_dev, responses, score, jnp.float32(self.kl.value),
            jnp.float32(self.stats[1]), jnp.float32(max(std, 1e-4)))

        t0, parts = time.perf_counter(), []
        for epoch in range(cfg.ppo_epochs):
            perm = np.random.default_rng([self.seed, it, epoch]).permutation(self.batch_size)
            self.actor.state, self.critic.state, m = self._epoch(
                self.actor.state, self.critic.state, exp, jnp.asarray(perm),
                None if next_ptx is None else next_ptx())
            parts.append(m)
            if (cfg.target_kl_early_stop is not None
                    and float(m["approx_kl"]) > cfg.target_kl_early_stop):
                break
        t_train = time.perf_counter() - t0

        scalars = {k: float(v) for k, v in jax.device_get(roll).items()}
        scalars.update(metrics_lib.mean_metrics(parts))
        tokens = self.batch_size * (self.prompt_len + cfg.max_decode_length)
        scalars.update({"kl_coef": self.kl.value, "ppo_epochs_run": len(parts),
                        "rollout_tokens_per_sec": scalars["num_response_tokens"]
                        / max(t_rollout, 1e-9),
                        "train_tokens_per_sec": len(parts) * tokens / max(t_train, 1e-9)})
        self.kl.update(scalars["kl"], self.batch_size)
        return scalars
