"""Encoder-decoder generation: the encoder runs once, then a `lax.while_loop` over decoder steps.

The decoder is reached through `step_fn(cache, tokens [n, 1]) -> (logits [n, vocab], cache)`: one token
per row at the cache's current position (self-attention keys/values are appended to the cache, the
cross-attention keys/values of the encoder output were stored when the cache was created; see
models/t5.py). Decoding starts from BOS (id 0, T5's decoder start token).

- `sample_decode`: greedy (temperature 0), temperature, top-k and top-p sampling (the filters of
  models/decoding.py); each row stops at its EOS, later positions hold `pad_id`.
- `beam_search`: beams with a GNMT length penalty ((5 + len) / 6)^alpha on finished hypotheses, the
  cache reordered along the surviving beams each step, early exit once no live beam can win. A
  hypothesis finishes only when its EOS ranks within the top `beam_size` candidates of the step (as
  in HF transformers), so beam size 1 reproduces greedy decoding.
Both are traceable with static shapes; callers wrap them in `jax.jit`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from zhchat.models import decoding

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]
NEG_INF = -1.0e9


def sample_decode(step_fn: StepFn, cache: Any, rng: Array, *, batch_size: int, max_decode_length: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = 1,
                  pad_id: int = 0, bos_id: int = 0, return_log_probs: bool = False
                  ) -> Array | tuple[Array, Array]:
    """Tokens [batch, max_decode_length] (EOS kept, pad after it); with `return_log_probs` also the
    log-probability of each token under softmax(logits / temperature), unfiltered (0 on padding)."""
    if max_decode_length <= 0:
        raise ValueError(f"max_decode_length must be positive, got {max_decode_length}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def body(state):
        t, cache, last, out, log_probs, done = state
        logits, cache = step_fn(cache, last[:, None])
        token, out, log_probs, done = decoding.sample_and_record(
            logits.astype(jnp.float32), jax.random.fold_in(rng, t), t, out, log_probs, done,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
        return t + 1, cache, token, out, log_probs, done

    def cond(state):
        t, *_, done = state
        return (t < max_decode_length) & ~jnp.all(done)

    state = (jnp.array(0, jnp.int32), cache, jnp.full((batch_size,), bos_id, jnp.int32),
             jnp.full((batch_size, max_decode_length), pad_id, jnp.int32),
             jnp.zeros((batch_size, max_decode_length), jnp.float32), jnp.zeros((batch_size,), bool))
    _, _, _, out, log_probs, _ = jax.lax.while_loop(cond, body, state)
    return (out, log_probs) if return_log_probs else out


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT / T5X brevity penalty ((5 + length) / 6)^alpha; 1 when alpha is 0."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def expand_to_beams(x: Array, beam_size: int) -> Array:
    """[batch, ...] -> [batch * beam_size, ...], each row repeated beam_size times."""
    return jnp.repeat(x, beam_size, axis=0)


def _gather_beams(x: Array, beam_idx: Array, batch: int, beams: int) -> Array:
    """Rows of x [batch * old_beams, ...] picked by beam_idx [batch, beams] -> [batch * beams, ...]."""
    old = x.shape[0] // batch
    x = x.reshape((batch, old) + x.shape[1:])
    idx = beam_idx.reshape(beam_idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1).reshape((batch * beams,) + x.shape[2:])


def _reorder_cache(cache: Any, beam_idx: Array, batch: int, beams: int) -> Any:
    """Gathers the per-beam cache entries; scalars and cross-attention K/V (the same for every beam of
    an example) are left alone."""
    def one(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if x.ndim == 0 or name.startswith("cross_") or x.shape[0] != batch * beams:
            return x
        return _gather_beams(x, beam_idx, batch, beams)
    return jax.tree_util.tree_map_with_path(one, cache)


def beam_search(step_fn: StepFn, cache: Any, *, batch_size: int, beam_size: int, max_decode_length: int,
                alpha: float = 0.6, eos_id: int = 1, pad_id: int = 0, bos_id: int = 0
                ) -> tuple[Array, Array]:
    """Beam search over a cache built for batch_size * beam_size rows (see `expand_to_beams`).

    Returns (sequences [batch, beam, max_decode_length], scores [batch, beam]) best first; a score is
    the summed log-probability divided by length_penalty(length) (length counts the EOS). Hypotheses
    still live after max_decode_length steps compete as they are (length max_decode_length).
    """
    b, k, steps = batch_size, beam_size, max_decode_length
    if k < 1 or steps < 1:
        raise ValueError(f"beam_size and max_decode_length must be positive, got {k}, {steps}")

    def last_tokens(seqs, t):  # the token each beam fed last: BOS first, then its previous token
        prev = jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(t - 1, 0), axis=2, keepdims=False)
        return jnp.where(t == 0, bos_id, prev).reshape(b * k, 1)

    def body(state):
        t, cache, seqs, lps, fin_seqs, fin_scores = state
        logits, cache = step_fn(cache, last_tokens(seqs, t))
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
        candidates = (lps[:, :, None] + log_probs).reshape(b, k * vocab)
        top_lp, top_idx = jax.lax.top_k(candidates, min(2 * k, k * vocab))
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(seqs, parent[:, :, None], axis=1)
        top_seqs = top_seqs.at[:, :, t].set(token)
        is_eos = token == eos_id
        # live beams: the best k candidates that did not just end
        live_lp, live_pos = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_lp), k)
        new_seqs = jnp.take_along_axis(top_seqs, live_pos[:, :, None], axis=1)
        cache = _reorder_cache(cache, jnp.take_along_axis(parent, live_pos, axis=1), b, k)
        # finished: candidates that ended within the top k (so beam 1 is greedy), merged with the
        # ones kept so far
        in_top_k = jnp.arange(top_lp.shape[1])[None, :] < k
        ended = jnp.where(is_eos & in_top_k, top_lp / length_penalty(t + 1, alpha), NEG_INF)
        pool_scores = jnp.concatenate([fin_scores, ended], axis=1)
        pool_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        fin_scores, fin_pos = jax.lax.top_k(pool_scores, k)
        fin_seqs = jnp.take_along_axis(pool_seqs, fin_pos[:, :, None], axis=1)
        return t + 1, cache, new_seqs, live_lp, fin_seqs, fin_scores

    def cond(state):
        t, _, _, lps, _, fin_scores = state
        # a live beam can at best keep its log-prob and get the largest penalty
        best_live = jnp.max(lps, axis=1) / length_penalty(steps, alpha)
        worst_fin = jnp.min(fin_scores, axis=1)
        can_improve = best_live > worst_fin
        return (t < steps) & jnp.any(can_improve)

    init_lps = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), NEG_INF)]), (b, 1))
    state = (jnp.array(0, jnp.int32), cache, jnp.full((b, k, steps), pad_id, jnp.int32), init_lps,
             jnp.full((b, k, steps), pad_id, jnp.int32), jnp.full((b, k), NEG_INF))
    _, _, seqs, lps, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, state)
    # The loop ends early only when every finished slot is filled and no live beam can beat them;
    # otherwise it ran max_decode_length steps and the live beams are max-length hypotheses.
    pool_scores = jnp.concatenate([fin_scores, lps / length_penalty(steps, alpha)], axis=1)
    pool_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
    scores, pos = jax.lax.top_k(pool_scores, k)
    return jnp.take_along_axis(pool_seqs, pos[:, :, None], axis=1), scores
