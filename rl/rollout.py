"""Policy-side pieces of PPO for both architectures: sampling, response masks and the
teacher-forced forward that gives per-response-token logits and hidden states.

Prompts are [batch, prompt_len] with pad = 0; they are left-aligned first (`left_pad`) so that, for
the decoder, prompt + response is one contiguous row and the logits at position prompt_len - 1 + t
predict response token t. For T5 the prompt is the encoder input and the decoder reads BOS +
response[:-1]. Responses come from the KV-cache samplers (models/decoding.py,
models/encdec_decoding.py) through the wrappers' jitted `predict_batch`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from zhchat.rl import heads

Array = jax.Array


def left_pad(tokens: Array, pad_id: int = 0) -> Array:
    """Moves every row's real tokens to the right end (order kept), pads to the left."""
    order = jnp.argsort(tokens != pad_id, axis=1, stable=True)
    return jnp.take_along_axis(tokens, order, axis=1)


def response_mask(responses: Array, eos_id: int) -> Array:
    """1 on response tokens up to and including the first EOS (sampled pad ids inside count)."""
    is_eos = (responses == eos_id).astype(jnp.int32)
    before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (before == 0).astype(jnp.int32)


def generate(model: Any, params: Any, prompts: Array, rng: Array, *, max_decode_length: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Samples responses [batch, max_decode_length] (pad after EOS) with the KV-cache sampler."""
    key = "encoder_input_tokens" if heads.is_encoder_decoder(model) else "decoder_input_tokens"
    return model.predict_batch(params, {key: prompts}, rng, max_decode_length=max_decode_length,
                               temperature=temperature, top_k=top_k, top_p=top_p)


def response_forward(model: Any, params: Any, prompts: Array, responses: Array, resp_mask: Array
                     ) -> tuple[Array, Array]:
    """(fp32 logits [b, R, vocab], hidden [b, R, dim]) at the positions that predict each response
    token, for a DecoderOnlyModel or EncoderDecoderModel (`params` its own tree)."""
    length = responses.shape[1]
    if heads.is_encoder_decoder(model):
        dec_in = jnp.concatenate([jnp.zeros_like(responses[:, :1]), responses[:, :-1]], axis=1)
        dec_in = jnp.where(jnp.concatenate([jnp.ones_like(resp_mask[:, :1]), resp_mask[:, :-1]], 1)
                           > 0, dec_in, model.pad_id)
        return heads.t5_forward(model, params, prompts, dec_in)
    prompt_len = prompts.shape[1]
    tokens = jnp.concatenate([prompts, responses], axis=1)
    mask = jnp.concatenate([prompts != model.pad_id, resp_mask > 0], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, hidden = heads.decoder_forward(model, params, tokens, positions=positions,
                                           segment_ids=mask.astype(jnp.int32))
    sl = slice(prompt_len - 1, prompt_len - 1 + length)
    return logits[:, sl], hidden[:, sl]


def reward_inputs(reward_model: Any, prompts: Array, responses: Array, resp_mask: Array
                  ) -> tuple[Array, Array, Array | None]:
    """(tokens, mask, encoder tokens) for RewardModel.rewards_masked from a rollout."""
    if reward_model.encdec:
        bos = jnp.zeros_like(responses[:, :1])
        tokens = jnp.concatenate([bos, jnp.where(resp_mask > 0, responses, 0)], axis=1)
        mask = jnp.concatenate([jnp.ones_like(resp_mask[:, :1]), resp_mask], axis=1)
        return tokens, mask, prompts
    tokens = jnp.concatenate([prompts, responses], axis=1)
    mask = jnp.concatenate([prompts != reward_model.pad_id, resp_mask > 0], axis=1)
    return tokens, mask, None
