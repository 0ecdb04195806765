"""EncoderDecoderModel: the BaseModel wrapper for the T5 v1.1 encoder-decoder (models/t5.py).

Same conventions as DecoderOnlyModel (models/decoder_model.py): fp32 logits, mean token cross-entropy
over `decoder_loss_weights` plus z-loss, metrics `loss`, `cross_entropy`, `z_loss`, `accuracy`,
`num_tokens`. Batches are seqio.EncDecFeatureConverter outputs (packed or not). Dropout runs when
`loss_fn` gets a dropout rng. Generation: `predict_batch` samples (greedy/temperature/top-k/top-p) or
runs beam search (`beam_size`), the encoder once per batch (models/encdec_decoding.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from zhchat.models import encdec_decoding, stacks
from zhchat.models.base_model import Batch, BaseModel, Params
from zhchat.models.losses import cross_entropy_with_logits, weighted_token_loss
from zhchat.models.t5 import T5, T5Config

_REQUIRED = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
             "decoder_loss_weights")


@gin.configurable
class EncoderDecoderModel(BaseModel):
    """T5-style encoder-decoder wrapper: loss_fn, score_batch, predict_batch, FLOPs, parameters."""

    def __init__(self, *, config: T5Config, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 eos_id: int = 1, pad_id: int = 0, flops_inputs_length: int | None = None):
        if not isinstance(config, T5Config):
            raise TypeError(f"EncoderDecoderModel.config must be a T5Config, got {type(config)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"EncoderDecoderModel.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.config = config
        self.module = T5(config)
        # decoding runs unrolled layers (a scanned cache would be copied every step)
        self.decode_module = T5(dataclasses.replace(config, scan_layers=False, remat_policy="none"))
        self.z_loss, self.label_smoothing = z_loss, label_smoothing
        self.eos_id, self.pad_id = eos_id, pad_id
        self.flops_inputs_length = flops_inputs_length
        self._decode_fns: dict[tuple, Any] = {}

    # ---- parameters -------------------------------------------------------------------------
    def init_params(self, rng: jax.Array, batch_shapes: Mapping[str, tuple]) -> Params:
        """Boxed parameters. Shapes do not depend on lengths (relative positions are bucketed), so
        a missing encoder shape (the trainer passes decoder shapes) reuses the decoder's.

        Unrolled stacks are initialised as scanned ones and split per layer (models/stacks.py:
        T5-large unrolled has 559 weights, ~1 minute of init compile otherwise; the same
        distributions either way)."""
        dec = tuple(batch_shapes["decoder_input_tokens"])
        enc = tuple(batch_shapes.get("encoder_input_tokens", dec))
        module = self.module if self.config.scan_layers else T5(
            dataclasses.replace(self.config, scan_layers=True))
        params = module.init(rng, jnp.ones(enc, jnp.int32), jnp.ones(dec, jnp.int32))["params"]
        return params if self.config.scan_layers else self._split_stacks(params)

    def abstract_params(self) -> Params:
        """Parameter ShapeDtypeStructs (boxed) via jax.eval_shape: nothing is allocated."""
        shapes = {"decoder_input_tokens": (1, 1)}
        return jax.eval_shape(lambda rng: self.init_params(rng, shapes), jax.random.PRNGKey(0))

    def num_params(self) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
            nn.unbox(self.abstract_params()))))

    def flops_per_token(self, seq_len: int, inputs_length: int | None = None) -> float:
        """Training FLOPs per target token (PaLM appendix B), the encoder's share included.

        seq_len is the targets length; the encoder sees `inputs_length` tokens per example
        (default `flops_inputs_length`, else seq_len). 6·N per token for the matmul weights each
        token passes through, 12·L·H·Dh per attended key: full in the encoder and in
        cross-attention, half (causal) in decoder self-attention.
        """
        cfg = self.config
        enc_len = inputs_length or self.flops_inputs_length or seq_len
        d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
        attn, mlp = 4 * d * hd, 3 * d * cfg.d_ff
        enc_n = cfg.num_encoder_layers * (attn + mlp)
        dec_n = cfg.num_decoder_layers * (2 * attn + mlp) + d * cfg.vocab_size
        enc_tok = 6.0 * enc_n + 12.0 * cfg.num_encoder_layers * hd * enc_len
        dec_tok = (6.0 * dec_n + 12.0 * cfg.num_decoder_layers * hd * (seq_len / 2 + enc_len))
        return dec_tok + enc_tok * enc_len / seq_len

    # ---- training / scoring -----------------------------------------------------------------
    def _logits(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        missing = [k for k in _REQUIRED[:2] if k not in batch]
        if missing:
            raise KeyError(f"EncoderDecoderModel: batch lacks {missing}; has {sorted(batch)}")
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
            enable_dropout=dropout_rng is not None, rngs=rngs)

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: jax.Array | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Mean cross-entropy over decoder_loss_weights + z-loss; metrics as DecoderOnlyModel's."""
        missing = [k for k in _REQUIRED if k not in batch]
        if missing:
            raise KeyError(f"EncoderDecoderModel.loss_fn: batch lacks {missing}; has {sorted(batch)}")
        logits = self._logits(params, batch, dropout_rng)
        return weighted_token_loss(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"], z_loss=self.z_loss,
                                   label_smoothing=self.label_smoothing)

    def score_batch(self, params: Params, batch: Batch) -> jnp.ndarray:
        """Summed log p(target | inputs) over the weighted target tokens of each row: [batch]."""
        logits = self._logits(params, batch)
        ce, _ = cross_entropy_with_logits(logits, batch["decoder_target_tokens"])
        weights = jnp.asarray(batch.get("decoder_loss_weights", batch["decoder_target_tokens"] > 0),
                              jnp.float32)
        return -jnp.sum(ce * weights, axis=-1)

    # ---- decoding ---------------------------------------------------------------------------
    def encode(self, params: Params, encoder_input_tokens: jnp.ndarray) -> jnp.ndarray:
        return self.module.apply({"params": params}, encoder_input_tokens, method=T5.encode)

    def decode_params(self, params: Params) -> Params:
        """`params` in `decode_module`'s unrolled layout (scanned stacks split per layer)."""
        return params if not self.config.scan_layers else self._split_stacks(params)

    def _split_stacks(self, params: Params) -> Params:
        cfg = self.config
        return stacks.split_stacks(params, {"encoder": cfg.num_encoder_layers,
                                            "decoder": cfg.num_decoder_layers})

    def init_cache(self, params: Params, encoded: jnp.ndarray, encoder_segment_ids: jnp.ndarray,
                   max_decode_length: int) -> Any:
        """A cache of `max_decode_length` positions holding the cross-attention K/V of `encoded`."""
        bos = jnp.zeros((encoded.shape[0], 1), jnp.int32)
        _, variables = self.decode_module.apply(
            {"params": self.decode_params(params)}, encoded, encoder_segment_ids, bos, decode=True,
            max_decode_length=max_decode_length, method=T5.decode, mutable=["cache"])
        return variables["cache"]

    def step_fn(self, params: Params, encoder_segment_ids: jnp.ndarray, max_decode_length: int
                ) -> encdec_decoding.StepFn:
        """The decoding callback: one token per row through the cached decoder -> fp32 logits."""
        params = self.decode_params(params)

        def step(cache, tokens):
            logits, variables = self.decode_module.apply(
                {"params": params, "cache": cache}, None, encoder_segment_ids, tokens, decode=True,
                max_decode_length=max_decode_length, method=T5.decode, mutable=["cache"])
            return logits[:, 0], variables["cache"]
        return step

    def _generate(self, params, encoder_input_tokens, rng, *, max_decode_length, temperature, top_k,
                  top_p, beam_size, alpha, return_log_probs):
        encoder_input_tokens = encoder_input_tokens.astype(jnp.int32)
        segments = (encoder_input_tokens != self.pad_id).astype(jnp.int32)
        encoded = self.encode(params, encoder_input_tokens)
        batch = encoder_input_tokens.shape[0]
        if beam_size:
            encoded = encdec_decoding.expand_to_beams(encoded, beam_size)
            segments = encdec_decoding.expand_to_beams(segments, beam_size)
        cache = self.init_cache(params, encoded, segments, max_decode_length)
        step = self.step_fn(params, segments, max_decode_length)
        if beam_size:
            return encdec_decoding.beam_search(
                step, cache, batch_size=batch, beam_size=beam_size, max_decode_length=max_decode_length,
                alpha=alpha, eos_id=self.eos_id, pad_id=self.pad_id)
        return encdec_decoding.sample_decode(
            step, cache, rng, batch_size=batch, max_decode_length=max_decode_length,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.eos_id,
            pad_id=self.pad_id, return_log_probs=return_log_probs)

    def predict_batch(self, params: Params, batch: Batch, rng: jax.Array | None = None, *,
                      max_decode_length: int = 64, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, beam_size: int | None = None, alpha: float = 0.6,
                      return_all_beams: bool = False, return_log_probs: bool = False, **unused):
        """Generates targets for `encoder_input_tokens` (padded with pad_id): [batch, max_decode_length].

        beam_size=None samples (temperature 0 = greedy; `return_log_probs` adds per-token log-probs);
        an int runs beam search with length-penalty exponent `alpha` and returns the best beam, or
        (sequences [batch, beam, len], scores [batch, beam]) with `return_all_beams`.
        """
        if unused:
            raise TypeError(f"EncoderDecoderModel.predict_batch: unknown decode options {sorted(unused)}")
        if beam_size is not None and beam_size < 1:
            raise ValueError(f"beam_size must be >= 1 or None, got {beam_size}")
        key = (max_decode_length, float(temperature), int(top_k), float(top_p), beam_size,
               float(alpha), bool(return_log_probs))
        if key not in self._decode_fns:
            self._decode_fns[key] = jax.jit(lambda p, tokens, r: self._generate(
                p, tokens, r, max_decode_length=max_decode_length, temperature=temperature,
                top_k=top_k, top_p=top_p, beam_size=beam_size, alpha=alpha,
                return_log_probs=return_log_probs))
        rng = jax.random.PRNGKey(0) if rng is None else rng
        out = self._decode_fns[key](params, jnp.asarray(batch["encoder_input_tokens"]), rng)
        if beam_size and not return_all_beams:
            return out[0][:, 0]
        return out


_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def fill_spans(model: EncoderDecoderModel, params: Params, vocab: Any, text: str, *,
               max_decode_length: int = 64, beam_size: int | None = None,
               rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0
               ) -> tuple[str, dict[int, str]]:
    """Lets a span-corruption-trained model fill the `<extra_id_N>` markers of `text`.

    `vocab` is a zhchat.tasks.vocabulary.Vocabulary (or anything with encode/decode/sentinel_id/
    vocab_size). Greedy by default; `beam_size`, or `rng` with `temperature`/`top_k` to sample.
    Returns (text with every marker replaced by its predicted span, {N: span} for the markers of
    `text`); a marker the model left out stays in the text, spans it adds for absent markers are
    dropped.
    """
    ids: list[int] = []
    pos = 0
    for match in _SENTINEL.finditer(text):
        ids += vocab.encode(text[pos:match.start()]) + [vocab.sentinel_id(int(match.group(1)))]
        pos = match.end()
    ids += vocab.encode(text[pos:]) + [model.eos_id]
    tokens = np.asarray([ids], np.int32)
    decode = {"beam_size": beam_size} if beam_size else {"temperature": temperature, "top_k": top_k}
    out = np.asarray(model.predict_batch(params, {"encoder_input_tokens": tokens}, rng,
                                         max_decode_length=max_decode_length, **decode))[0]
    asked = {int(m.group(1)) for m in _SENTINEL.finditer(text)}
    first_sentinel = vocab.vocab_size - vocab.extra_ids
    spans: dict[int, list[int]] = {}
    current = None
    for tok in out.tolist():
        if tok == model.eos_id:
            break
        if tok >= first_sentinel:
            current = vocab.vocab_size - 1 - tok
            spans.setdefault(current, [])
        elif current is not None:
            spans[current].append(tok)
    filled = {n: vocab.decode(span) for n, span in spans.items() if n in asked}
    result = _SENTINEL.sub(lambda m: filled.get(int(m.group(1)), m.group(0)), text)
    return result, filled
