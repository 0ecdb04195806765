"""Token-by-token generation for interactive use (chat, a server): a Python generator that yields
each sampled id as soon as the device has it, for both model families.

It runs the same cached step functions and the same sampler (`decoding.sample_logits`) as the
batched decoders (models/decoding.py, models/encdec_decoding.py), one jitted call per token, so a
greedy stream equals the model's own `predict_batch` token for token. Prompts are padded to
multiples of `bucket` so a conversation compiles a few shapes, not one per turn.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhchat.models import decoding


class TokenStreamer:
    """Streams the continuation of one prompt; `stream(params, prompt_ids, rng, ...)`."""

    def __init__(self, model: Any, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, bucket: int = 32):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.model, self.bucket = model, bucket
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.encoder_decoder = hasattr(model, "encode")  # EncoderDecoderModel
        self._fns: dict[tuple, tuple[Callable, Callable]] = {}

    def stream(self, params: Any, prompt: Sequence[int], rng: jax.Array, *,
               max_new_tokens: int, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Sampled ids after `prompt` (for a T5, the encoder input), up to `max_new_tokens`; stops
        before the first of `stop_ids`, which is not yielded."""
        if not prompt:
            raise ValueError("an empty prompt: a decoder needs at least one token (e.g. BOS)")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        limit = getattr(self.model.config, "max_len", None)  # a T5 has no position limit
        if limit is not None and len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt length {len(prompt)} + max_new_tokens {max_new_tokens} "
                             f"exceeds DecoderConfig.max_len={limit}")
        width = -(-len(prompt) // self.bucket) * self.bucket
        stops = set(int(s) for s in stop_ids)
        start, advance = self._compiled(width, max_new_tokens)
        if self.encoder_decoder:
            tokens = np.full((1, width), self.model.pad_id, np.int32)
            tokens[0, :len(prompt)] = prompt
            context = jnp.asarray(tokens != self.model.pad_id, jnp.int32)  # encoder segments
        else:  # left-padded: the prompt ends where generation starts
            tokens = np.zeros((1, width), np.int32)
            tokens[0, width - len(prompt):] = prompt
            mask = np.zeros((1, width), bool)
            mask[0, width - len(prompt):] = True
            context = jnp.asarray(mask)
        token, cache = start(params, jnp.asarray(tokens), context, jax.random.fold_in(rng, 0))
        for t in range(max_new_tokens):
            tok = int(token[0])
            if tok in stops:
                return
            yield tok
            if t + 1 == max_new_tokens:
                return
            token, cache = advance(params, cache, token, context, jnp.int32(len(prompt) + t),
                                   jnp.int32(t), jax.random.fold_in(rng, t + 1))

    def _compiled(self, width: int, max_new_tokens: int) -> tuple[Callable, Callable]:
        key = (width, max_new_tokens)
        if key not in self._fns:
            build = self._encdec_fns if self.encoder_decoder else self._decoder_fns
            self._fns[key] = tuple(jax.jit(f) for f in build(width, max_new_tokens))
        return self._fns[key]

    def _sample(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return decoding.sample_logits(logits.astype(jnp.float32), rng, **self.sampling)

    def _decoder_fns(self, width: int, max_new_tokens: int) -> tuple[Callable, Callable]:
        # the cache may outgrow max_len by the bucket's left padding: positions count real tokens
        model, cache_len = self.model, width + max_new_tokens

        def start(params, tokens, mask, rng):
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            kv = jnp.concatenate([mask, jnp.zeros((1, max_new_tokens), bool)], 1)
            logits, cache = model.step_fn(params)(model.init_cache(1, cache_len), tokens,
                                                  positions, kv, None)
            return self._sample(logits[:, -1], rng), cache

        def advance(params, cache, token, mask, position, t, rng):
            # generated token t sits in cache slot width + t, at position (prompt length + t)
            kv = jnp.concatenate([mask, jnp.arange(max_new_tokens)[None] <= t], 1)
            logits, cache = model.step_fn(params)(cache, token[:, None],
                                                  jnp.full((1, 1), position), kv, None)
            return self._sample(logits[:, -1], rng), cache
        return start, advance

    def _encdec_fns(self, width: int, max_new_tokens: int) -> tuple[Callable, Callable]:
        model = self.model

        def start(params, tokens, segments, rng):
            cache = model.init_cache(params, model.encode(params, tokens), segments,
                                     max_new_tokens)
            bos = jnp.zeros((1, 1), jnp.int32)  # T5 starts the decoder from id 0
            logits, cache = model.step_fn(params, segments, max_new_tokens)(cache, bos)
            return self._sample(logits, rng), cache

        def advance(params, cache, token, segments, position, t, rng):
            del position, t  # the decoder cache keeps its own index
            logits, cache = model.step_fn(params, segments, max_new_tokens)(cache, token[:, None])
            return self._sample(logits, rng), cache
        return start, advance
