"""Policy-side pieces of PPO for both architectures: sampling, response masks and the
teacher-forced forward that gives per-response-token logits and hidden states.

Prompts are [batch, prompt_len] with pad = 0, left-aligned first (`left_pad`). How each family
reads a prompt and its response is rl/layouts.py. Responses come from the KV-cache samplers
(models/decoding.py, models/encdec_decoding.py) through the wrappers' jitted `predict_batch`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from zhchat.rl import layouts

Array = jax.Array
left_pad = layouts.left_pad  # the rollout's prompt alignment


def response_mask(responses: Array, eos_id: int) -> Array:
    """1 on response tokens up to and including the first EOS (sampled pad ids inside count)."""
    is_eos = (responses == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (before == 0).astype(jnp.int32)


def generate(model: Any, params: Any, prompts: Array, rng: Array, *, max_decode_length: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Samples responses [batch, max_decode_length] (pad after EOS) with the KV-cache sampler."""
    feature = layouts.layout_for(model).prompt_feature
    return model.predict_batch(params, {feature: prompts}, rng, max_decode_length=max_decode_length,
                               temperature=temperature, top_k=top_k, top_p=top_p)


def response_forward(model: Any, params: Any, prompts: Array, responses: Array, resp_mask: Array
                     ) -> tuple[Array, Array]:
    """(fp32 logits [b, R, vocab], hidden [b, R, dim]) at the positions that predict each response
    token, for a DecoderOnlyModel or EncoderDecoderModel (`params` its own tree)."""
    return layouts.layout_for(model).response_forward(model, params, prompts, responses,
                                                      resp_mask)


def reward_inputs(reward_model: Any, prompts: Array, responses: Array, resp_mask: Array
                  ) -> tuple[Array, Array, Array | None]:
    """(tokens, mask, encoder tokens) for RewardModel.rewards_masked from a rollout."""
    return reward_model.layout.scored_rows(reward_model.pad_id, prompts, responses, resp_mask)
