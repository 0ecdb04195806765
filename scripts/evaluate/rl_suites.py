"""The RLHF suites: reward-model pairwise accuracy, a policy against a reference policy (reward-model
win rate and KL), and chat-template samples on a prompt file."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from zhchat.tasks import sources


def reward_model_accuracy(rm: Any, rm_params: Any, examples: Sequence[dict], *,
                          prompt_len: int, response_len: int, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen reply (first) the reward model scores above the rejected one,
    and the mean margin (as the trainer's held-out RM metrics)."""
    import jax

    from zhchat.tasks.preference_reader import collate

    rewards_fn = jax.jit(rm.rewards)
    diffs = []
    for s in range(0, len(examples), batch_size):
        chunk = list(examples[s:s + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # one shape for every batch
        batch = collate(chunk, encoder_decoder=rm.encdec, prompt_len=prompt_len,
                        response_len=response_len, num_responses=2)
        feed = {k: batch[k] for k in ("decoder_input_tokens", "encoder_input_tokens") if k in batch}
        r = np.asarray(rewards_fn(rm_params, feed))[:n]
        diffs += (r[:, 0] - r[:, 1]).tolist()
    diffs = np.asarray(diffs)
    return {"pairs": len(diffs), "pairwise_accuracy": float(np.mean(diffs > 0)) if len(diffs) else None,
            "margin": float(np.mean(diffs)) if len(diffs) else None}


def _sequence_log_probs(model: Any, params: Any, prompts, responses, mask) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from zhchat.rl import rollout

    logits, _ = rollout.response_forward(model, params, prompts, responses, mask)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), responses[..., None], -1)[..., 0]
    return np.asarray(jnp.sum(lp * mask, -1))


def policy_vs_reference(model: Any, params: Any, ref_params: Any, rm: Any, rm_params: Any,
                        prompts: np.ndarray, *, eos_id: int, max_decode_length: int = 64,
                        temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> dict:
    """Both policies answer the same left-padded prompts; the reward model scores each reply.
    Win rate = share of prompts where the policy's reply scores higher; KL = mean over prompts of
    the summed log p_policy - log p_reference of the policy's own reply (a Monte-Carlo estimate of
    KL(policy || reference), as PPO's penalty)."""
    import jax
    import jax.numpy as jnp

    from zhchat.rl import ppo_step, rollout

    out: dict[str, Any] = {}
    replies = {}
    for name, p in (("policy", params), ("reference", ref_params)):
        responses = rollout.generate(model, p, jnp.asarray(prompts), jax.random.key(seed),
                                     max_decode_length=max_decode_length, temperature=temperature,
                                     top_p=top_p)
        score = ppo_step.scores(rm_params, jnp.asarray(prompts), responses, eos_id=eos_id,
                                reward_model=rm, reward_fn=None)
        replies[name] = (responses, np.asarray(score, np.float64))
        out[f"rm_score_{name}"] = float(np.mean(replies[name][1]))
    responses = replies["policy"][0]
    mask = rollout.response_mask(responses, eos_id).astype(jnp.float32)
    kl = (_sequence_log_probs(model, params, jnp.asarray(prompts), responses, mask)
          - _sequence_log_probs(model, ref_params, jnp.asarray(prompts), responses, mask))
    out.update(prompts=int(prompts.shape[0]),
               win_rate=float(np.mean(replies["policy"][1] > replies["reference"][1])),
               kl=float(np.mean(kl)))
    return out


def read_prompts(path: str, counter: sources.SkipCounter) -> list[str]:
    """Prompts of a text file (one a line) or JSON lines ({"prompt": ...}); blank or malformed
    lines are counted."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                counter.add("samples_blank_line", f"{path}:{n}")
                continue
            if line.startswith("{"):
                try:
                    line = str(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    counter.add("samples_malformed_line", f"{path}:{n}")
                    continue
            prompts.append(line)
    return prompts


def chat_samples(model: Any, params: Any, vocab: Any, prompts: Sequence[str], *,
                 max_new_tokens: int = 128, temperature: float = 0.7, top_k: int = 20,
                 seed: int = 0) -> list[dict]:
    """One chat-template reply per prompt (a single user turn), as the chat CLI renders it."""
    from zhchat.scripts.chat import ChatSession

    session = ChatSession(model, params, vocab, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, seed=seed)
    return [{"prompt": p, "reply": session.reply([{"role": "user", "content": p}])}
            for p in prompts]
