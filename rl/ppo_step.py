"""The jitted halves of a PPO iteration: experience (scoring a rollout) and one epoch of updates.

Experience: old log-probs of the policy, log-probs of the frozen reference, critic values and the
sequence score (reward model or a reward function) of each sampled response; the per-token reward is
-β (log π - log π_ref) with the (normalised, clipped) score added at the last response token;
GAE gives advantages (whitened) and returns. Update: the minibatches of one epoch in a `lax.scan`,
each a step on the clipped policy loss + vf_coef · clipped value loss - ent_coef · entropy
(+ ptx_coef · the policy's LM loss on a pretraining batch, PPO-ptx).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import gin
import jax
import jax.numpy as jnp

from zhchat.rl import gae as gae_lib
from zhchat.rl import losses, rollout
from zhchat.trainer import train_state as ts

Array = jax.Array


@flax.struct.dataclass
class Experience:
    """One scored rollout, [batch, ...] arrays: what the actor sampled and what the learner needs
    (old log-probs and values at sampling time, GAE advantages and returns)."""
    prompts: Array
    responses: Array
    mask: Array  # 1 on response tokens up to and including EOS
    old_log_probs: Array
    old_values: Array
    advantages: Array
    returns: Array


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO hyperparameters (InstructGPT / Ziegler et al. defaults where they give one)."""

    max_decode_length: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    ptx_coef: float = 0.0
    ppo_epochs: int = 4
    num_minibatches: int = 4
    whiten_advantages: bool = True
    normalize_reward: bool = True
    reward_clip: float = 10.0
    target_kl_early_stop: float | None = None  # stop an iteration's epochs once approx-KL exceeds it

    def __post_init__(self):
        for f in ("max_decode_length", "ppo_epochs", "num_minibatches"):
            if getattr(self, f) < 1:
                raise ValueError(f"PPOConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0, got {self.temperature}")


def _values(critic: Any, params: Any, prompts: Array, responses: Array, mask: Array) -> Array:
    _, hidden = rollout.response_forward(critic.backbone, params["backbone"], prompts, responses, mask)
    return critic.head.apply({"params": params["head"]}, hidden)


def _log_probs(policy: Any, params: Any, prompts: Array, responses: Array, mask: Array,
               temperature: float) -> tuple[Array, Array]:
    logits, _ = rollout.response_forward(policy, params, prompts, responses, mask)
    logits = logits / temperature
    return losses.token_log_probs(logits, responses), logits


def scores(reward_params: Any, prompts: Array, responses: Array, *, eos_id: int, reward_model: Any,
           reward_fn: Callable | None) -> Array:
    """Sequence scores [batch] of sampled responses: the reward model's, or reward_fn's."""
    mask = rollout.response_mask(responses, eos_id)
    if reward_fn is not None:
        return reward_fn(prompts, responses, mask).astype(jnp.float32)
    return reward_model.rewards_masked(
        reward_params, *rollout.reward_inputs(reward_model, prompts, responses, mask))


def experience(policy_params: Any, ref_params: Any, critic_params: Any, prompts: Array,
               responses: Array, score: Array, kl_coef: Array, score_mean: Array, score_std: Array,
               *, cfg: PPOConfig, policy: Any, critic: Any) -> tuple[Experience, dict[str, Array]]:
    """(experience batch, rollout metrics) for sampled `responses` to `prompts` scored `score`."""
    mask = rollout.response_mask(responses, policy.eos_id)
    fmask = mask.astype(jnp.float32)
    logp, logits = _log_probs(policy, policy_params, prompts, responses, mask, cfg.temperature)
    ref_logp, _ = _log_probs(policy, ref_params, prompts, responses, mask, cfg.temperature)
    values = _values(critic, critic_params, prompts, responses, mask) * fmask
    shaped = (score - score_mean) / score_std if cfg.normalize_reward else score
    shaped = jnp.clip(shaped, -cfg.reward_clip, cfg.reward_clip)
    kl_tok = (logp - ref_logp) * fmask
    length = jnp.sum(mask, axis=1)
    last = jax.nn.one_hot(jnp.maximum(length - 1, 0), responses.shape[1])
    rewards = -kl_coef * kl_tok + last * shaped[:, None]
    adv, returns = gae_lib.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = gae_lib.whiten(adv, mask)
    resid_var = losses.masked_mean(jnp.square(returns - values - losses.masked_mean(
        returns - values, fmask)), fmask)
    ret_var = losses.masked_mean(jnp.square(returns - losses.masked_mean(returns, fmask)), fmask)
    exp = Experience(prompts=prompts, responses=responses, mask=mask, old_log_probs=logp,
                     old_values=values, advantages=adv, returns=returns)
    metrics = {"reward_mean": jnp.mean(score), "reward_std": jnp.std(score),
               "shaped_score_mean": jnp.mean(shaped),
               "kl": jnp.mean(jnp.sum(kl_tok, axis=1)),
               "kl_per_token": losses.masked_mean(kl_tok, fmask),
               "entropy": losses.masked_mean(losses.entropy_from_logits(logits), fmask),
               "response_length": jnp.mean(length.astype(jnp.float32)),
               "value_mean": losses.masked_mean(values, fmask),
               "explained_variance": 1.0 - resid_var / jnp.maximum(ret_var, 1e-8),
               "num_response_tokens": jnp.sum(fmask)}
    return exp, metrics


def minibatch_loss(policy_params: Any, critic_params: Any, mb: Experience,
                   ptx_batch: dict[str, Array] | None, *, cfg: PPOConfig, policy: Any, critic: Any
                   ) -> tuple[Array, dict[str, Array]]:
    """Clipped policy loss + vf_coef · clipped value loss - ent_coef · entropy (+ PPO-ptx)."""
    mask = mb.mask
    logp, logits = _log_probs(policy, policy_params, mb.prompts, mb.responses, mask,
                              cfg.temperature)
    pg, pm = losses.clipped_policy_loss(logp, mb.old_log_probs, mb.advantages, mask,
                                        cfg.clip_eps)
    entropy = losses.masked_mean(losses.entropy_from_logits(logits), mask)
    values = _values(critic, critic_params, mb.prompts, mb.responses, mask)
    vf, vm = losses.clipped_value_loss(values, mb.old_values, mb.returns, mask,
                                       cfg.value_clip_eps)
    total = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
    metrics = {"policy_loss": pg, "value_loss": vf, "entropy_train": entropy, **pm, **vm}
    if ptx_batch is not None:
        ptx, _ = policy.loss_fn(policy_params, ptx_batch, None)
        total = total + cfg.ptx_coef * ptx
        metrics["ptx_loss"] = ptx
    metrics["total_loss"] = total
    return total, metrics


def train_epoch(policy_state: ts.TrainState, critic_state: ts.TrainState, exp: Experience,
                perm: Array, ptx_batches: dict[str, Array] | None, *, cfg: PPOConfig, policy: Any,
                critic: Any, constrain: Callable = lambda x: x
                ) -> tuple[ts.TrainState, ts.TrainState, dict[str, Array]]:
    """One PPO epoch: `exp` shuffled by `perm`, split into cfg.num_minibatches interleaved
    minibatches, one optimizer step of each model per minibatch. Metrics are epoch means."""
    shuffled = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), exp)
    minibatches = ts.split_microbatches(shuffled, cfg.num_minibatches)
    grad_fn = jax.grad(lambda pp, cp, mb, ptx: minibatch_loss(
        pp, cp, mb, ptx, cfg=cfg, policy=policy, critic=critic), argnums=(0, 1), has_aux=True)

    def body(states, xs):
        p_state, c_state = states
        mb, ptx = xs
        (p_grads, c_grads), metrics = grad_fn(p_state.params, c_state.params, constrain(mb),
                                              None if ptx is None else constrain(ptx))
        return (p_state.apply_gradients(p_grads), c_state.apply_gradients(c_grads)), metrics

    (policy_state, critic_state), parts = jax.lax.scan(
        body, (policy_state, critic_state), (minibatches, ptx_batches))
    return policy_state, critic_state, jax.tree.map(jnp.mean, parts)
