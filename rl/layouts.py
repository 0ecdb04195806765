"""How each model family lays out a prompt and its response, in one place.

RL code (rollouts, reward and value models, DPO, pair building) works on (prompt, response)
pairs. A decoder reads them as one row: the prompt left-aligned to the response (`left_pad`), and
the logits at position prompt_len - 1 + t predict response token t. A T5 reads the prompt in its
encoder and BOS + response[:-1] in its decoder. Everything that differs between the two is a
method of `DecoderLayout` / `EncoderDecoderLayout`; `layout_for(model)` is the only place that
asks which family a model is.
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


class DecoderLayout:
    """A LLaMA-style decoder: prompt + response in one row."""

    encoder_decoder = False
    prompt_feature = "decoder_input_tokens"  # what predict_batch reads the prompts from

    @staticmethod
    def hidden_dim(config: Any) -> int:
        return int(config.emb_dim)

    @staticmethod
    def context_limit(config: Any) -> int | None:
        """The most prompt + response tokens a row can hold (the decoder's positions)."""
        return getattr(config, "max_len", None)

    @staticmethod
    def init_shapes(prompt_len: int, response_len: int) -> dict[str, tuple]:
        return {"decoder_input_tokens": (1, prompt_len + response_len)}

    @staticmethod
    def sampling_prompts(rows: Array, pad_id: int) -> Array:
        """Right-padded prompt rows as the sampler takes them (left-padded for a decoder)."""
        return left_pad(rows, pad_id)

    @staticmethod
    def forward(model: Any, params: Any, tokens: Array, mask: Array,
                encoder_tokens: Array | None = None) -> tuple[Array, Array]:
        """(fp32 logits, hidden) of rows whose real tokens `mask` marks (left padding masked
        out of attention, positions counted from each row's first real token)."""
        del encoder_tokens
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        return heads.decoder_forward(model, params, tokens, positions=positions,
                                     segment_ids=mask.astype(jnp.int32))

    def response_forward(self, model: Any, params: Any, prompts: Array, responses: Array,
                         resp_mask: Array) -> tuple[Array, Array]:
        """(logits [b, R, vocab], hidden [b, R, dim]) at the positions predicting each response
        token."""
        prompt_len, length = prompts.shape[1], responses.shape[1]
        tokens = jnp.concatenate([prompts, responses], axis=1)
        mask = jnp.concatenate([prompts != model.pad_id, resp_mask > 0], axis=1)
        logits, hidden = self.forward(model, params, tokens, mask)
        sl = slice(prompt_len - 1, prompt_len - 1 + length)
        return logits[:, sl], hidden[:, sl]

    @staticmethod
    def scored_rows(pad_id: int, prompts: Array, responses: Array, resp_mask: Array
                    ) -> tuple[Array, Array, Array | None]:
        """(tokens, mask, encoder tokens) a reward model scores for a rollout."""
        tokens = jnp.concatenate([prompts, responses], axis=1)
        mask = jnp.concatenate([prompts != pad_id, resp_mask > 0], axis=1)
        return tokens, mask, None

    @staticmethod
    def row_mask(tokens: Array, pad_id: int) -> Array:
        """Which tokens of stored (prompt + response) rows are real."""
        return tokens != pad_id


class EncoderDecoderLayout:
    """A T5: the prompt in the encoder, BOS (= pad id 0) + response in the decoder."""

    encoder_decoder = True
    prompt_feature = "encoder_input_tokens"

    @staticmethod
    def hidden_dim(config: Any) -> int:
        return int(config.d_model)

    @staticmethod
    def context_limit(config: Any) -> int | None:
        return None  # relative positions: no fixed limit

    @staticmethod
    def init_shapes(prompt_len: int, response_len: int) -> dict[str, tuple]:
        return {"encoder_input_tokens": (1, prompt_len), "decoder_input_tokens": (1, response_len)}

    @staticmethod
    def sampling_prompts(rows: Array, pad_id: int) -> Array:
        del pad_id
        return rows

    @staticmethod
    def forward(model: Any, params: Any, tokens: Array, mask: Array,
                encoder_tokens: Array | None = None) -> tuple[Array, Array]:
        del mask  # the decoder is causal and its padding follows the reply
        return heads.t5_forward(model, params, encoder_tokens, tokens)

    def response_forward(self, model: Any, params: Any, prompts: Array, responses: Array,
                         resp_mask: Array) -> tuple[Array, Array]:
        dec_in = jnp.concatenate([jnp.zeros_like(responses[:, :1]), responses[:, :-1]], axis=1)
        keep = jnp.concatenate([jnp.ones_like(resp_mask[:, :1]), resp_mask[:, :-1]], 1) > 0
        return heads.t5_forward(model, params, prompts, jnp.where(keep, dec_in, model.pad_id))

    @staticmethod
    def scored_rows(pad_id: int, prompts: Array, responses: Array, resp_mask: Array
                    ) -> tuple[Array, Array, Array | None]:
        del pad_id
        bos = jnp.zeros_like(responses[:, :1])
        tokens = jnp.concatenate([bos, jnp.where(resp_mask > 0, responses, 0)], axis=1)
        mask = jnp.concatenate([jnp.ones_like(resp_mask[:, :1]), resp_mask], axis=1)
        return tokens, mask, prompts

    @staticmethod
    def row_mask(tokens: Array, pad_id: int) -> Array:
        return (tokens != pad_id).at[:, 0].set(True)  # BOS (= pad id 0) opens every row


Layout = DecoderLayout | EncoderDecoderLayout


def layout_for(model: Any) -> Layout:
    """The layout of a DecoderOnlyModel or EncoderDecoderModel (TypeError for anything else)."""
    return EncoderDecoderLayout() if heads.is_encoder_decoder(model) else DecoderLayout()
