"""Batched KV-cache sampling: prefill the prompts, then a `lax.while_loop` over new tokens.

Greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling; each row stops at its own
EOS (later positions hold `pad_id`) and the loop ends when every row is done or `max_decode_length`
tokens were produced. Everything is traceable with static shapes, so callers wrap it in `jax.jit`.

The model is reached through a `step_fn(cache, tokens, positions, kv_mask, prefix) -> (logits, cache)`
that runs `tokens` [batch, len] at cache slots [index, index + len) (see models/decoder.py). Prompts
occupy slots [0, prompt_len) with their padding (left or right, any mix) masked out by `kv_mask`;
generated token t of every row goes to slot prompt_len + t at position (real prompt length + t).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Any, Array, Array, Array, Array | None], tuple[Array, Any]]


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets logits outside the top-k and outside the smallest nucleus of mass >= top_p to -inf."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sample_logits(logits: Array, rng: Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """Draws one token id per row of logits [batch, vocab]; temperature 0 means argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_and_record(logits: Array, rng: Array, t: Array, out: Array, log_probs: Array,
                      done: Array, *, temperature: float, top_k: int, top_p: float,
                      eos_id: int | None, pad_id: int) -> tuple[Array, Array, Array, Array]:
    """One sampling step of a decode loop: samples from fp32 `logits` [batch, vocab], writes the token
    (pad after EOS) and its log-prob under softmax(logits / temperature) at column `t`, and updates
    the per-row done flags. Returns (token, out, log_probs, done)."""
    token = sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    lp = jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], axis=1)[:, 0]
    token = jnp.where(done, pad_id, token)
    out = out.at[:, t].set(token)
    log_probs = log_probs.at[:, t].set(jnp.where(done, 0.0, lp))
    if eos_id is not None:
        done = done | (token == eos_id)
    return token, out, log_probs, done


def decode(step_fn: StepFn, cache: Any, prompt_tokens: Array, rng: Array, *,
           max_decode_length: int, prompt_mask: Array | None = None, prefix: Array | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None = 1, pad_id: int = 0, return_log_probs: bool = False,
           first_token_mask: Array | None = None) -> Array | tuple[Array, Array]:
    """Samples up to `max_decode_length` tokens after each prompt.

    prompt_tokens [batch, prompt_len]; `prompt_mask` marks real prompt tokens (default: != pad_id);
    every row needs at least one (e.g. BOS). `cache` must be empty and hold prompt_len +
    max_decode_length slots. `prefix` (1 on prompt tokens) makes the prompt bidirectional (prefix LM).
    Returns tokens [batch, max_decode_length] (EOS kept, pad after it) and, with `return_log_probs`,
    the log-probability of each sampled token under softmax(logits / temperature) without top-k/top-p
    filtering (the plain model distribution at temperature 0 or 1; 0 on padding).
    `first_token_mask` [batch, vocab] (bool) limits the first sampled token to its True ids (token
    healing: `Vocabulary.heal`).
    """
    if max_decode_length <= 0:
        raise ValueError(f"max_decode_length must be positive, got {max_decode_length}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch, prompt_len = prompt_tokens.shape
    if prompt_mask is None:
        prompt_mask = prompt_tokens != pad_id
    prompt_mask = prompt_mask.astype(bool)
    lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    gen_slots = jnp.arange(max_decode_length)

    def kv_mask_at(t):  # valid cache slots once generated token t has been written
        return jnp.concatenate([prompt_mask, jnp.broadcast_to(gen_slots <= t, (batch, max_decode_length))], 1)

    logits, cache = step_fn(cache, prompt_tokens, positions, kv_mask_at(-1), prefix)
    last = jnp.max(jnp.where(prompt_mask, jnp.arange(prompt_len), 0), axis=1)
    logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    if first_token_mask is not None:
        logits = jnp.where(first_token_mask, logits, jnp.finfo(jnp.float32).min)

    def body(state):
        t, cache, logits, out, log_probs, done = state
        token, out, log_probs, done = sample_and_record(
            logits, jax.random.fold_in(rng, t), t, out, log_probs, done, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
        next_logits, cache = step_fn(cache, token[:, None], (lengths + t)[:, None], kv_mask_at(t), None)
        return t + 1, cache, next_logits[:, 0].astype(jnp.float32), out, log_probs, done

    def cond(state):
        t, *_, done = state
        return (t < max_decode_length) & ~jnp.all(done)

    state = (jnp.array(0, jnp.int32), cache, logits,
             jnp.full((batch, max_decode_length), pad_id, jnp.int32),
             jnp.zeros((batch, max_decode_length), jnp.float32), jnp.zeros((batch,), bool))
    _, _, _, out, log_probs, _ = jax.lax.while_loop(cond, body, state)
    return (out, log_probs) if return_log_probs else out
