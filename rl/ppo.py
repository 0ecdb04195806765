"""PPO (RLHF, InstructGPT step 3) for a decoder or T5 policy: the gin-configured loop.

Per iteration: a batch of prompts -> responses from the jitted KV-cache sampler -> experience
(rl/ppo_step.py: log-probs, reference log-probs, values, scores, KL-shaped rewards, GAE) ->
`ppo_epochs` epochs of minibatch updates of the policy and the critic (optionally stopping early
once approx-KL passes `target_kl_early_stop`) -> KL-coefficient update -> metrics (TensorBoard +
metrics.jsonl through trainer/metrics.py) -> orbax checkpoint (trainer/checkpoints.py) of policy,
critic, reward statistics, KL coefficient and prompt position, from which a run resumes. The frozen
reference is not saved: it is the policy's starting parameters (`policy_params`, e.g. read from the
SFT checkpoint, or the seeded init), rebuilt from that source when a run resumes.

Policy, reference, critic and reward model live on one mesh (trainer/partitioning.py): parameters by
their logical axes, rollout batches split over the data axes. The reward is a RewardModel
(rl/reward_model.py; it must share the policy's vocabulary) or, for tests and toys, a jnp function
`reward_fn(prompts, responses, response_mask) -> [batch]`.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from zhchat.rl import heads, kl_controller, ppo_step, roles, rollout
from zhchat.rl.reward_model import RewardModel, check_same_vocabulary
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import metrics as metrics_lib
from zhchat.trainer import optimizers, partitioning
from zhchat.trainer import feed


def _running_stats(stats: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Chan et al.'s merge of (count, mean, M2) with a batch of scores."""
    n, mean, m2 = stats
    b = scores.size
    b_mean, b_m2 = float(scores.mean()), float(((scores - scores.mean()) ** 2).sum())
    total = n + b
    delta = b_mean - mean
    return np.array([total, mean + delta * b / total, m2 + b_m2 + delta ** 2 * n * b / total])


def _abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@gin.configurable
def train_ppo(*, policy: Any = gin.REQUIRED, critic: RewardModel = gin.REQUIRED,
              prompts: Any = gin.REQUIRED, reward_model: RewardModel | None = None,
              reward_params: Any = None, reward_fn: Callable | None = None,
              policy_params: Any = None, critic_params: Any = None,
              critic_from_reward_model: bool = True, ptx_data: Any = None,
              config: ppo_step.PPOConfig | None = None,
              kl: kl_controller.KLController | None = None,
              partitioner: partitioning.Partitioner | None = None,
              policy_optimizer: Any = None, critic_optimizer: Any = None,
              num_iterations: int = 100, batch_size: int = 16, run_dir: str | None = None,
              checkpoint_every: int = 50, keep_checkpoints: int | None = 3, seed: int = 0,
              progress_bar: bool = True) -> dict[str, Any]:
    """Runs (or resumes, from `run_dir`) `num_iterations` PPO iterations of `batch_size` prompts.

    `prompts` yields {"prompt_tokens": [batch, prompt_len]} (an iterator, iterable or trainer-style
    factory). `policy_params` / `critic_params` / `reward_params` are unboxed parameter trees (e.g.
    an SFT and an RM checkpoint); missing policy or critic parameters are initialised from `seed`
    (the critic from the reward model when `critic_from_reward_model` and the shapes agree).
    Returns {"iteration", "history", "policy_state", "critic_state", "reference_params"}.
    """
    cfg = config or ppo_step.PPOConfig()
    kl = kl or kl_controller.KLController()
    partitioner = partitioner or partitioning.Partitioner()
    heads.is_encoder_decoder(policy)
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("train_ppo: give exactly one of reward_model (with reward_params) or reward_fn")
    if reward_model is not None:
        check_same_vocabulary(policy, reward_model)
        if reward_params is None:
            raise ValueError("train_ppo: reward_model needs reward_params (a trained reward model)")
    check_same_vocabulary(policy, critic)
    if batch_size % cfg.num_minibatches or (batch_size // cfg.num_minibatches) % partitioner.data_parallel_size:
        raise ValueError(f"train_ppo.batch_size={batch_size} must split into PPOConfig.num_minibatches="
                         f"{cfg.num_minibatches} each divisible by the data-parallel size "
                         f"{partitioner.data_parallel_size}")
    prompt_it = feed.make_iterator(prompts, batch_size=batch_size, seed=seed)
    first = np.asarray(next(prompt_it)["prompt_tokens"], np.int32)
    prompt_len, resp_len = first.shape[1], cfg.max_decode_length
    p_rng, c_rng, s_rng = jax.random.split(jax.random.key(seed), 3)
    p_tx = policy_optimizer or optimizers.make_optimizer()
    c_tx = critic_optimizer or optimizers.make_optimizer()
    batch_sh, rep = partitioner.batch_sharding, partitioner.replicated

    p_shapes = roles.response_shapes(policy, prompt_len, resp_len)
    actor = roles.actor(policy, p_tx, partitioner, p_shapes, p_rng, policy_params)
    value = roles.critic(critic, c_tx, partitioner,
                         roles.response_shapes(critic.backbone, prompt_len, resp_len), c_rng,
                         critic_params, reward_params if critic_from_reward_model else None)
    # the frozen reference: the actor's starting parameters (a resumed run restores only the
    # actor and critic, so this is rebuilt from the same source: policy_params or the seed)
    ref = roles.reference(actor)
    judge = roles.reward(reward_model, reward_params, partitioner, roles.response_shapes(
        reward_model.backbone, prompt_len, resp_len) if reward_model is not None else {}, c_rng)
    p_state, p_sh, c_state, c_sh = actor.state, actor.shardings, value.state, value.shardings
    ref_params, reward_params = ref.params, judge.params
    with partitioner.activate():
        stats = np.array([0.0, 0.0, 0.0])
        start, prompt_start = 0, None
        checkpointer = None
        if run_dir:
            checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                                 keep=keep_checkpoints, save_every=checkpoint_every,
                                                 async_save=True)
            if checkpointer.latest_step() is not None:
                tree = {"policy": p_state, "critic": c_state}
                restored, data, start = checkpointer.restore(_abstract_like(tree))
                p_state, c_state = restored["policy"], restored["critic"]
                stats, kl.value = np.asarray(data["reward_stats"]), float(data["kl_coef"])
                prompt_start = data.get("prompt_state")
        if prompt_start is not None and hasattr(prompt_it, "set_state"):
            prompt_it.set_state(prompt_start)
            first = None
        elif start:  # no resumable position: skip the prompt batches already used
            for _ in range(start - 1):
                next(prompt_it)
            first = np.asarray(next(prompt_it)["prompt_tokens"], np.int32)

        score_fn = jax.jit(functools.partial(ppo_step.scores, eos_id=policy.eos_id,
                                             reward_model=reward_model, reward_fn=reward_fn),
                           out_shardings=rep)
        exp_fn = jax.jit(functools.partial(ppo_step.experience, cfg=cfg, policy=policy,
                                           critic=critic), out_shardings=(batch_sh, rep))
        constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sh)
        epoch_fn = jax.jit(functools.partial(ppo_step.train_epoch, cfg=cfg, policy=policy,
                                             critic=critic, constrain=constrain),
                           out_shardings=(p_sh, c_sh, rep), donate_argnums=(0, 1))
        ptx_it = (None if ptx_data is None or cfg.ptx_coef == 0 else feed.make_iterator(
            ptx_data, batch_size=batch_size // cfg.num_minibatches, seed=seed))
        writer = metrics_lib.MetricsWriter(run_dir, total_steps=num_iterations, initial_step=start,
                                           progress_bar=progress_bar)
        history = []
        for it in range(start, num_iterations):
            batch = first if first is not None else np.asarray(next(prompt_it)["prompt_tokens"], np.int32)
            first = None
            prompts_dev = jax.device_put(np.asarray(rollout.left_pad(jnp.asarray(batch), policy.pad_id)),
                                         batch_sh)
            t0 = time.perf_counter()
            responses = rollout.generate(policy, p_state.params, prompts_dev,
                                         jax.random.fold_in(s_rng, it),
                                         max_decode_length=resp_len, temperature=cfg.temperature,
                                         top_k=cfg.top_k, top_p=cfg.top_p)
            responses = jax.block_until_ready(jax.device_put(responses, batch_sh))
            t_rollout = time.perf_counter() - t0
            score = score_fn(reward_params, prompts_dev, responses)
            stats = _running_stats(stats, np.asarray(jax.device_get(score), np.float64))
            std = float(np.sqrt(stats[2] / stats[0])) if stats[0] > 1 else 1.0
            exp, roll = exp_fn(p_state.params, ref_params, c_state.params, prompts_dev, responses,
                               score, jnp.float32(kl.value), jnp.float32(stats[1]),
                               jnp.float32(max(std, 1e-4)))
            t0, epochs, parts = time.perf_counter(), 0, []
            for epoch in range(cfg.ppo_epochs):
                perm = np.random.default_rng([seed, it, epoch]).permutation(batch_size)
                ptx = None if ptx_it is None else _stack([next(ptx_it) for _ in range(cfg.num_minibatches)])
                p_state, c_state, m = epoch_fn(p_state, c_state, exp, jnp.asarray(perm), ptx)
                parts.append(m)
                epochs += 1
                if cfg.target_kl_early_stop is not None and float(m["approx_kl"]) > cfg.target_kl_early_stop:
                    break
            train_m = metrics_lib.mean_metrics(parts)
            t_train = time.perf_counter() - t0
            roll = jax.device_get(roll)
            scalars = {k: float(v) for k, v in roll.items()}
            scalars.update(train_m)
            scalars.update({"kl_coef": kl.value, "ppo_epochs_run": epochs,
                            "rollout_tokens_per_sec": scalars["num_response_tokens"] / max(t_rollout, 1e-9),
                            "train_tokens_per_sec": epochs * batch_size * (prompt_len + resp_len)
                            / max(t_train, 1e-9)})
            kl.update(scalars["kl"], batch_size)
            writer.write(it + 1, scalars, prefix="ppo")
            writer.advance()
            history.append({"iteration": it + 1, **scalars})
            if checkpointer is not None:
                data = {"reward_stats": stats.tolist(), "kl_coef": kl.value,
                        "prompt_state": prompt_it.get_state() if hasattr(prompt_it, "get_state") else None}
                checkpointer.save(it + 1, {"policy": p_state, "critic": c_state}, data,
                                  force=(it + 1 == num_iterations))
        if checkpointer is not None:
            checkpointer.close()
        writer.close()
    return {"iteration": num_iterations, "history": history, "policy_state": p_state,
            "critic_state": c_state, "reference_params": ref_params}


def _stack(batches: list[dict]) -> dict:
    return {k: jnp.asarray(np.stack([np.asarray(b[k]) for b in batches])) for k in batches[0]}
