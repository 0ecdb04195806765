"""The README demo's RLHF stage on tiny models: train a reward model, then PPO against it.

Synthetic 64-id vocabulary: the reward model learns, through trainer.train, that a "chosen" reply
contains the id `liked_token` and a "rejected" one does not; PPO then fine-tunes a tiny decoder
policy (critic initialised from the reward model) and its mean reward-model score rises.
Runs on CPU in about a minute.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import optax

from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel
from zhchat.rl import kl_controller, ppo, ppo_step, preference_data, reward_model
from zhchat.trainer import partitioning
from zhchat.trainer.train import train

VOCAB = 64


def _tiny_decoder() -> DecoderOnlyModel:
    return DecoderOnlyModel(config=DecoderConfig(
        vocab_size=VOCAB, emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
        mlp_dim=64, dtype="float32", max_len=64))


def _pairs(rng: np.random.Generator, n: int, liked: int) -> list[dict]:
    out = []
    for _ in range(n):
        prompt = rng.integers(8, VOCAB, size=int(rng.integers(2, 7))).tolist()
        length = int(rng.integers(3, 8))
        chosen = rng.integers(8, VOCAB, size=length).tolist()
        chosen[int(rng.integers(0, length))] = liked
        rejected = [t for t in rng.integers(8, VOCAB, size=length).tolist() if t != liked] or [9]
        out.append({"prompt": prompt, "responses": [chosen + [1], rejected + [1]], "scores": None})
    return out


def run_rm_and_ppo(run_dir: str, *, rm_steps: int = 60, ppo_iterations: int = 40, seed: int = 0,
                   liked_token: int = 7) -> dict[str, Any]:
    """Trains the reward model then runs PPO; returns {"rm_accuracy", "reward_curve" (mean RM score
    per PPO iteration), "kl_curve", "rm_history", "ppo_history"}. Writes metrics under run_dir/rm
    and run_dir/ppo (metrics.jsonl, TensorBoard)."""
    rng = np.random.default_rng(seed)
    train_ex, eval_ex = _pairs(rng, 512, liked_token), _pairs(rng, 128, liked_token)

    def batches(examples):
        def factory(batch_size, seed, shard_index, shard_count):
            r = np.random.default_rng(seed)
            while True:
                idx = r.choice(len(examples), batch_size, replace=False)
                yield preference_data.collate([examples[i] for i in idx], encoder_decoder=False,
                                              prompt_len=6, response_len=8, num_responses=2)
        return factory

    partitioner = partitioning.Partitioner()
    rm = reward_model.RewardModel(backbone=_tiny_decoder())
    rm_out = train(model=rm, train_data=batches(train_ex), eval_data=batches(eval_ex),
                   partitioner=partitioner, optimizer=optax.adam(3e-3), num_steps=rm_steps,
                   batch_size=32, eval_every=rm_steps, eval_steps=4, log_every=10,
                   run_dir=os.path.join(run_dir, "rm"), seed=seed, progress_bar=False)

    def prompts(batch_size, seed, shard_index, shard_count):
        r = np.random.default_rng(seed)
        while True:
            yield {"prompt_tokens": r.integers(8, VOCAB, size=(batch_size, 6)).astype(np.int32)}

    policy = _tiny_decoder()
    ppo_out = ppo.train_ppo(
        policy=policy, critic=reward_model.RewardModel(backbone=_tiny_decoder()), prompts=prompts,
        reward_model=rm, reward_params=rm_out["state"].params,
        config=ppo_step.PPOConfig(max_decode_length=8, ppo_epochs=2, num_minibatches=2),
        kl=kl_controller.KLController(init_coef=0.05), partitioner=partitioner,
        policy_optimizer=optax.adam(3e-3), critic_optimizer=optax.adam(3e-3),
        num_iterations=ppo_iterations, batch_size=16, run_dir=os.path.join(run_dir, "ppo"),
        seed=seed, progress_bar=False)
    hist = ppo_out["history"]
    return {"rm_accuracy": rm_out["eval_history"][-1]["accuracy"] if rm_out["eval_history"] else None,
            "reward_curve": [h["reward_mean"] for h in hist], "kl_curve": [h["kl"] for h in hist],
            "rm_history": rm_out["history"], "ppo_history": hist}
