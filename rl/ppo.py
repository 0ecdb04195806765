"""PPO (RLHF, InstructGPT step 3) for a decoder or T5 policy: the gin-configured loop.

Per iteration (rl/ppo_learner.py): a batch of prompts -> responses from the jitted KV-cache
sampler -> experience (rl/ppo_step.py: log-probs, reference log-probs, values, scores, KL-shaped
rewards, GAE) -> `ppo_epochs` epochs of minibatch updates of the policy and the critic -> the
KL-coefficient update. This loop around it uses the trainer's parts: metrics (TensorBoard +
metrics.jsonl), orbax checkpoints of policy, critic, reward statistics, KL coefficient and prompt
position (a failed background save stops the run; a resumed run continues from them), SIGTERM
(a final checkpoint) and the error path that releases writer threads. The frozen reference is
not saved: it is the policy's starting parameters (`policy_params`, e.g. read from the SFT
checkpoint, or the seeded init), rebuilt from that source when a run resumes.

Policy, reference, critic and reward model live on one mesh (trainer/partitioning.py): parameters by
their logical axes, rollout batches split over the data axes. The reward is a RewardModel
(rl/reward_model.py; it must share the policy's vocabulary) or, for tests and toys, a jnp function
`reward_fn(prompts, responses, response_mask) -> [batch]`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from zhchat.rl import heads, kl_controller, ppo_learner, ppo_step, roles
from zhchat.rl.reward_model import RewardModel, check_same_vocabulary
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import faults, feed, optimizers, partitioning
from zhchat.trainer import metrics as metrics_lib


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
    p_rng, c_rng, _ = jax.random.split(jax.random.key(seed), 3)
    p_tx = policy_optimizer or optimizers.make_optimizer()
    c_tx = critic_optimizer or optimizers.make_optimizer()

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
    learner = ppo_learner.PPOLearner(actor=actor, critic=value, reference=ref, reward=judge,
                                     reward_fn=reward_fn, cfg=cfg, kl=kl, partitioner=partitioner,
                                     batch_size=batch_size, prompt_len=prompt_len, seed=seed)
    ptx_it = (None if ptx_data is None or cfg.ptx_coef == 0 else feed.make_iterator(
        ptx_data, batch_size=batch_size // cfg.num_minibatches, seed=seed))
    next_ptx = None if ptx_it is None else (
        lambda: _stack([next(ptx_it) for _ in range(cfg.num_minibatches)]))

    with partitioner.activate():
        start, checkpointer = 0, None
        if run_dir:
            checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                                 keep=keep_checkpoints, save_every=checkpoint_every,
                                                 async_save=True)
            if checkpointer.latest_step() is not None:
                start, prompt_start = learner.restore(checkpointer)
                print(f"restored PPO iteration {start} from {checkpointer.directory}/{start}",
                      file=sys.stderr, flush=True)
                first = _resume_prompts(prompt_it, prompt_start, start)
        writer = metrics_lib.MetricsWriter(run_dir, total_steps=num_iterations, initial_step=start,
                                           progress_bar=progress_bar)
        history, done = [], start
        with faults.guarded_run(writer, checkpointer) as preempted:
            for it in range(start, num_iterations):
                if preempted.requested:
                    print(f"SIGTERM: stopping at PPO iteration {it} with a final checkpoint",
                          file=sys.stderr, flush=True)
                    break
                batch = first if first is not None else np.asarray(
                    next(prompt_it)["prompt_tokens"], np.int32)
                first = None
                scalars = learner.iteration(it, batch, next_ptx)
                done = it + 1
                writer.write(done, scalars, prefix="ppo")
                writer.advance()
                history.append({"iteration": done, **scalars})
                if checkpointer is not None:
                    checkpointer.check()  # a background save that failed stops the run now
                    checkpointer.save(done, learner.state_tree(), _data(learner, prompt_it),
                                      force=(done == num_iterations))
            if checkpointer is not None:
                if done > start and done < num_iterations:  # preempted: keep what was done
                    checkpointer.save(done, learner.state_tree(), _data(learner, prompt_it),
                                      force=True)
                checkpointer.close()
            writer.close()
    return {"iteration": done, "history": history, "policy_state": actor.state,
            "critic_state": value.state, "reference_params": ref.params}


def _data(learner: ppo_learner.PPOLearner, prompt_it: Any) -> dict[str, Any]:
    """The checkpoint's data item: the learner's statistics and the prompt position."""
    return {**learner.data(),
            "prompt_state": prompt_it.get_state() if hasattr(prompt_it, "get_state") else None}


def _resume_prompts(prompt_it: Any, prompt_state: Any, start: int) -> np.ndarray | None:
    """Moves the prompt stream to where a resumed run stopped; returns the first batch to use
    when it had to be read to get there (None: the saved position was restored)."""
    if prompt_state is not None and hasattr(prompt_it, "set_state"):
        prompt_it.set_state(prompt_state)
        return None
    for _ in range(start - 1):  # no resumable position: skip the batches already used
        next(prompt_it)
    return np.asarray(next(prompt_it)["prompt_tokens"], np.int32)


def _stack(batches: list[dict]) -> dict:
    return {k: jnp.asarray(np.stack([np.asarray(b[k]) for b in batches])) for k in batches[0]}
