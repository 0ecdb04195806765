"""T5 v1.1 encoder-decoder in flax.linen.

Pre-RMSNorm blocks with residual dropout, relative position biases shared by the layers of a stack
(bidirectional buckets in the encoder, causal in the decoder; none in cross-attention), gated-GELU MLPs,
no biases anywhere, one token embedding shared by encoder and decoder inputs and an untied output layer.
Kernels are initialised as T5X and HF T5 do (fan-in scaled); the output layer starts at std
0.5 / sqrt(d_model) (HF T5 draws it at std 1.0: initial logits of std ~sqrt(d_model)).
Packed examples are kept apart by segment ids on both sides: encoder self-attention, decoder
self-attention (causal) and cross-attention only see tokens of the same segment. Parameters are fp32;
compute runs in `dtype` (bf16 on accelerators). Dropout is active only with `enable_dropout=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from zhchat.models import attention, bucket_attention, cross_attention, layers, t5_layers
from zhchat.models.remat import REMAT_POLICIES, checkpoint_policy

Array = jax.Array
_ACT = ("activation_batch", "activation_length", "activation_embed")


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Sizes and numerics of a T5 v1.1 model (gin presets in gin_configs/models/t5_*.gin)."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    dropout_rate: float = 0.0
    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    attention_impl: str = "auto"     # layers.ATTENTION_IMPLEMENTATIONS; "pallas": bucket kernel
    # Packed rows' cross-attention through cuDNN's packed layout (models/cross_attention.py), with
    # this many table slots a row. Off by default: measured slower than cuDNN with the dense
    # [batch, 1, dec, enc] mask on T5-large's packed SFT rows (BENCHMARKS.md).
    packed_cross_attention: bool = False
    max_segments_per_row: int = 16
    scan_layers: bool = False        # nn.scan over each stack: one compiled layer, fast compiles
    remat_policy: str = "none"       # as DecoderConfig.remat_policy (training; decoding never remats)
    # Shared embedding std: 1.0 as T5/T5X/HF. Measured best with both optimizers (T5-small, 1,200
    # steps, BENCHMARKS.md): AdamW 6.03 held-out CE at 1.0 vs 6.09 at 0.02; Adafactor 6.84 vs 7.16.
    # (Unlike the decoder's tied table, it never scales the logits: the readout is untied.)
    embedding_init_std: float = 1.0
    logits_init_std: float | None = None  # untied output layer; None: 0.5 / sqrt(d_model)

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                      "num_decoder_layers", "relpos_buckets", "relpos_max_distance"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"T5Config.{field}={getattr(self, field)!r} must be positive")
        if self.max_segments_per_row < 2:
            raise ValueError(f"T5Config.max_segments_per_row={self.max_segments_per_row!r} must "
                             "be >= 2")
        if not self.embedding_init_std > 0:
            raise ValueError(f"T5Config.embedding_init_std={self.embedding_init_std!r} must be > 0")
        if self.logits_init_std is not None and not self.logits_init_std >= 0:
            raise ValueError(f"T5Config.logits_init_std={self.logits_init_std!r} must be >= 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if self.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"T5Config.attention_impl={self.attention_impl!r} must be one of "
                             f"{layers.ATTENTION_IMPLEMENTATIONS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"T5Config.remat_policy={self.remat_policy!r} must be one of "
                             f"{REMAT_POLICIES}")
        for field in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError as e:
                raise ValueError(f"T5Config.{field}={getattr(self, field)!r} is not a dtype") from e

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def _make(module, cfg: T5Config, **kwargs):
    return module(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, **kwargs)


class EncoderLayer(nn.Module):
    """One pre-norm encoder block; positional arguments and (x, None) out, so it scans."""

    config: T5Config

    @nn.compact
    def __call__(self, x, mask, bias, lengths, deterministic):
        cfg = self.config
        h = _make(layers.RMSNorm, cfg, name="pre_attention_norm")(x)
        h = _make(t5_layers.T5Attention, cfg, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                  attention_impl=cfg.attention_impl, name="attention")(
            h, None, mask=mask, bias=bias, lengths=lengths)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = _make(layers.RMSNorm, cfg, name="pre_mlp_norm")(x)
        h = _make(t5_layers.GatedGeluMlp, cfg, d_ff=cfg.d_ff, dropout_rate=cfg.dropout_rate,
                  name="mlp")(h, deterministic=deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, _ACT), None


class DecoderLayer(nn.Module):
    """One pre-norm decoder block (self-, cross-attention, MLP); scans like EncoderLayer."""

    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, self_mask, self_bias, cross_mask, self_lengths, cross_lengths,
                 decode_index, deterministic, decode, max_decode_length):
        cfg = self.config
        attn = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, attention_impl=cfg.attention_impl)
        h = _make(layers.RMSNorm, cfg, name="pre_self_attention_norm")(x)
        h = _make(t5_layers.T5Attention, cfg, name="self_attention", **attn)(
            h, None, mask=self_mask, bias=self_bias, decode=decode, decode_index=decode_index,
            max_decode_length=max_decode_length, lengths=self_lengths, causal=True)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = _make(layers.RMSNorm, cfg, name="pre_cross_attention_norm")(x)
        h = _make(t5_layers.T5Attention, cfg, cross=True, name="encoder_decoder_attention", **attn)(
            h, encoded, mask=cross_mask, decode=decode, lengths=cross_lengths)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = _make(layers.RMSNorm, cfg, name="pre_mlp_norm")(x)
        h = _make(t5_layers.GatedGeluMlp, cfg, d_ff=cfg.d_ff, dropout_rate=cfg.dropout_rate,
                  name="mlp")(h, deterministic=deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, _ACT), None


def _layer_stack(layer: type[nn.Module], cfg: T5Config, num_layers: int, *, num_args: int,
                 num_static: int, name: str) -> list:
    """The layers of one stack: `name`_i modules, or one scanned module `name` whose parameters
    gain a leading "layers" axis. A layer takes `num_args` positional arguments, the last
    `num_static` of them Python values (static for remat); remat follows `remat_policy`."""
    if cfg.remat_policy != "none":
        layer = nn.remat(layer, policy=checkpoint_policy(cfg.remat_policy),
                         prevent_cse=not cfg.scan_layers,
                         # argnum 0 is the module itself
                         static_argnums=tuple(range(num_args - num_static + 1, num_args + 1)))
    if not cfg.scan_layers:
        return [layer(cfg, name=f"{name}_{i}") for i in range(num_layers)]
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * (num_args - 1), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return [scanned(cfg, name=name)]


def _run_stack(stack: list, x: Array, *args) -> Array:
    for layer in stack:
        x, _ = layer(x, *args)
    return x


def _segments(tokens: Array, segment_ids: Array | None) -> Array:
    """Segment ids, or (unpacked batches) 1 on every non-padding token."""
    return (tokens > 0).astype(jnp.int32) if segment_ids is None else segment_ids


class DecodePosition(nn.Module):
    """The decode cache's write position: returns (cache existed, position) and advances it."""

    @nn.compact
    def __call__(self):
        initialised = self.has_variable("cache", "position")
        position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        index = position.value
        if initialised:
            position.value = index + 1
        return initialised, index


class T5(nn.Module):
    """T5 v1.1: `__call__` for training/scoring, `encode` + `decode` for generation."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = _make(
            layers.Embed, cfg, num_embeddings=cfg.vocab_size, features=cfg.d_model,
            embedding_init=nn.initializers.normal(stddev=cfg.embedding_init_std))
        relpos = dict(num_heads=cfg.num_heads, num_buckets=cfg.relpos_buckets,
                      max_distance=cfg.relpos_max_distance)
        self.encoder_relpos = _make(t5_layers.RelativePositionBiases, cfg, bidirectional=True, **relpos)
        self.decoder_relpos = _make(t5_layers.RelativePositionBiases, cfg, bidirectional=False, **relpos)
        self.encoder_layers = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, num_args=5,
                                           num_static=1, name="encoder")
        self.decoder_layers = _layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, num_args=11,
                                           num_static=3, name="decoder")
        self.encoder_norm = _make(layers.RMSNorm, cfg)
        self.decoder_norm = _make(layers.RMSNorm, cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.decode_position = DecodePosition()
        readout_std = (layers.readout_init_std(cfg.d_model) if cfg.logits_init_std is None
                       else cfg.logits_init_std)
        self.logits_dense = _make(layers.DenseGeneral, cfg, features=cfg.vocab_size,
                                  kernel_axes=("embed", "vocab"),
                                  kernel_init=nn.initializers.normal(stddev=readout_std))

    def _bucket_kernel(self) -> bool:
        """Self-attention in training through the bucket kernel (models/bucket_attention.py)."""
        cfg = self.config
        if cfg.attention_impl != "pallas":
            return False
        if not bucket_attention.supported(cfg.head_dim):
            layers.warn_once(f"attention_impl='pallas' needs a power-of-two head dim, got "
                             f"{cfg.head_dim}: T5 attention runs as 'auto'")
            return False
        return True

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None, *,
               enable_dropout: bool = False) -> Array:
        """Encoder output [batch, enc_len, d_model]."""
        deterministic = not enable_dropout
        segments = _segments(encoder_input_tokens, encoder_segment_ids)
        mask = layers.make_attention_mask(segments, segments)
        positions = jnp.arange(encoder_input_tokens.shape[1])
        bias = (self.encoder_relpos.bucketed(segments) if self._bucket_kernel()
                else self.encoder_relpos(positions, positions))
        x = self.token_embedder(encoder_input_tokens)
        x = self.dropout(nn.with_logical_constraint(x, _ACT), deterministic=deterministic)
        # no segment ids: rows are unpacked (one example + padding), so lengths replace the mask
        lengths = (t5_layers.padding_lengths(segments, segments) if encoder_segment_ids is None
                   else None)
        x = _run_stack(self.encoder_layers, x, mask, bias, lengths, deterministic)
        return self.dropout(self.encoder_norm(x), deterministic=deterministic)

    def decode(self, encoded: Array | None, encoder_segment_ids: Array, decoder_input_tokens: Array,
               decoder_segment_ids: Array | None = None, *, enable_dropout: bool = False,
               decode: bool = False, max_decode_length: int | None = None,
               unpacked: bool = False) -> Array:
        """Decoder logits [batch, dec_len, vocab] (fp32).

        unpacked=True (training on a batch without segment ids) attends with per-row lengths
        instead of dense masks (see T5Attention).

        decode=True runs one step with the cache: the first call (no cache yet) creates the cache of
        `max_decode_length` positions and stores the cross-attention K/V of `encoded`; every later
        call feeds one token [batch, 1] at the cache's position and advances it (`encoded` unused).
        """
        deterministic = not enable_dropout
        length = decoder_input_tokens.shape[1]
        decode_index = self_lengths = cross_lengths = None
        if decode:
            initialised, decode_index = self.decode_position()
            if not max_decode_length:
                raise ValueError("decode=True needs max_decode_length (the cache length)")
            cache_len = max_decode_length
            query_pos = jnp.reshape(decode_index if initialised else 0, (1,))
            key_pos = jnp.arange(cache_len) if initialised else query_pos
            self_bias = self.decoder_relpos(query_pos, key_pos)
            self_mask = (key_pos <= query_pos[0])[None, None, None, :]
            cross_mask = (encoder_segment_ids > 0)[:, None, None, :]
        else:
            cache_len = None
            # Unpacked targets start with BOS = 0, so padding cannot be told from tokens: all in one
            # segment (padded positions are causal-masked from real ones and carry no loss).
            segments = (jnp.ones_like(decoder_input_tokens) if decoder_segment_ids is None
                        else decoder_segment_ids)
            self_mask = layers.make_attention_mask(segments, segments, causal=True)
            positions = jnp.arange(length)
            self_bias = (self.decoder_relpos.bucketed(segments) if self._bucket_kernel()
                         else self.decoder_relpos(positions, positions))
            cfg = self.config
            packed_cross = cfg.packed_cross_attention and attention.uses_packed_kernel(
                cfg.attention_impl, cfg.compute_dtype, cfg.head_dim)
            if decoder_segment_ids is not None and packed_cross:
                info = cross_attention.cross_info(
                    segments, encoder_segment_ids, cfg.max_segments_per_row,
                    groups=attention.batch_groups(segments.shape[0]))
                cross_mask = t5_layers.PackedCross(segments, encoder_segment_ids, info)
            else:
                cross_mask = layers.make_attention_mask(segments, encoder_segment_ids)
            if unpacked:
                self_lengths = t5_layers.padding_lengths(segments, segments)
                cross_lengths = t5_layers.padding_lengths(segments, encoder_segment_ids)
        x = self.token_embedder(decoder_input_tokens)
        x = self.dropout(nn.with_logical_constraint(x, _ACT), deterministic=deterministic)
        if decode and self.config.scan_layers:
            raise ValueError("decode=True needs unrolled layers: decode with scan_layers=False "
                             "(EncoderDecoderModel does, splitting the scanned parameters)")
        x = _run_stack(self.decoder_layers, x, encoded, self_mask, self_bias, cross_mask,
                       self_lengths, cross_lengths, decode_index, deterministic, decode, cache_len)
        x = self.dropout(self.decoder_norm(x), deterministic=deterministic)
        logits = self.logits_dense(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                   "activation_vocab"))

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
                 *, enable_dropout: bool = False) -> Array:
        """Teacher-forced logits [batch, dec_len, vocab] (fp32) for a (packed) batch."""
        enc_segments = _segments(encoder_input_tokens, encoder_segment_ids)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                              enable_dropout=enable_dropout)
        return self.decode(encoded, enc_segments, decoder_input_tokens, decoder_segment_ids,
                           enable_dropout=enable_dropout,
                           unpacked=encoder_segment_ids is None and decoder_segment_ids is None)
