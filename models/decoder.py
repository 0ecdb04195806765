"""LLaMA-style decoder-only transformer in flax.linen.

Pre-norm RMSNorm blocks with rotary positions, grouped-query attention and a SwiGLU MLP; no biases;
fp32 parameters, `dtype` compute. Packed rows are handled with segment ids (no attention across
segments, positions restart per segment), prefix-LM rows with `prefix` (1 on bidirectional inputs).

Attention over packed rows is models/attention.py's `packed_causal_attention`: unpacked rows
(segment ids 1...1 0...0) take plain causal flash attention, packed rows cuDNN's packed flash
attention on Hopper GPUs when the batch's documents fit its segment table
(`max_segments_per_row` slots a row, shared across rows; rows are sorted by document count within
each data-parallel shard for it, and put back before the output norm: `sort_packed_rows`),
anything else a dense [batch, 1, len, len] mask (also XLA's path on CPU/TPU). Prefix-LM rows
split into a bidirectional call over each segment's inputs and a causal call, both on those paths
(models/prefix_attention.py), when their inputs lead each segment; else the mask.
The choice is made at run time, so one compiled step serves every batch; outputs on padding
positions may differ between the paths (they carry no loss).

Initialisation follows HF `LlamaForCausalLM` (its `initializer_range`): the token embedding and
every kernel are drawn from normal(0, `init_std` = 0.02); tied logits are `x @ embedding.T`, unscaled.
`residual_init="depth"` divides the attention and MLP output projections by sqrt(2 * num_layers)
(GPT-2); an untied output layer starts at std 0.5 / sqrt(emb_dim) (initial logits of std 0.5 at any
width) unless `logits_init_std` is set. Why not T5's std-1 embedding with logits scaled by
1/sqrt(emb_dim): under AdamW's absolute steps a std-1 table moves ~50x slower relative to its
scale than a std-0.02 one, and the model trained at bigram level (BENCHMARKS.md, "Initialisation").

Decoding (`decode=True`) keeps a T5X-style "cache" collection per layer (cached_key, cached_value,
cache_index). Every row writes its new tokens to the same cache slots; `kv_mask` [batch, cache_len]
says which slots hold real tokens, so left- or right-padded prompts of any lengths share one batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from zhchat.models import attention, layers, prefix_attention
from zhchat.models.remat import REMAT_POLICIES, checkpoint_policy

Array = jax.Array
RESIDUAL_INITS = ("none", "depth")


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Sizes and numerics of the decoder; bound from gin_configs/models/decoder_*.gin."""

    vocab_size: int = 32000
    emb_dim: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1536
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    remat_policy: str = "none"
    max_segments_per_row: int = 16
    sort_packed_rows: bool = True
    split_prefix_attention: bool = True     # False: prefix-LM rows keep the dense mask (to compare)
    embedding_grad: str = "one_hot"
    scan_layers: bool = False
    attention_impl: str = "auto"
    max_len: int = 2048
    init_std: float = 0.02                  # embedding and kernels: normal(0, init_std), as HF Llama
    residual_init: str = "none"             # "depth": output projections / sqrt(2 * num_layers)
    logits_init_std: float | None = None    # untied output layer; None: 0.5 / sqrt(emb_dim)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"DecoderConfig.{field}={getattr(self, field)!r}: {why}")
        for f in ("vocab_size", "emb_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim", "max_len"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even for rotary embeddings")
        if not self.init_std > 0:
            bad("init_std", "must be positive")
        if self.logits_init_std is not None and not self.logits_init_std >= 0:
            bad("logits_init_std", "must be >= 0 (or None for 0.5 / sqrt(emb_dim))")
        if self.residual_init not in RESIDUAL_INITS:
            bad("residual_init", f"must be one of {RESIDUAL_INITS}")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"must be one of {REMAT_POLICIES}")
        if self.embedding_grad not in layers.EMBEDDING_GRADS:
            bad("embedding_grad", f"must be one of {layers.EMBEDDING_GRADS}")
        if self.max_segments_per_row < 2:
            bad("max_segments_per_row", "must be >= 2")
        if self.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
            bad("attention_impl", f"must be one of {layers.ATTENTION_IMPLEMENTATIONS}")
        for f in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, f))
            except TypeError:
                bad(f, "is not a dtype name")


def _constrain(x: Array, *names: str) -> Array:
    return nn.with_logical_constraint(x, names)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _output_init(cfg: DecoderConfig):
    """Init of the projections that write into the residual stream (attention out, MLP wo)."""
    scale = 1.0 if cfg.residual_init == "none" else (2.0 * cfg.num_layers) ** -0.5
    return _normal(cfg.init_std * scale)


def _dense(cfg: DecoderConfig, features, axes, name, *, axis=-1, init=None):
    return layers.DenseGeneral(features=features, axis=axis, kernel_axes=axes,
                               dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                               kernel_init=init or _normal(cfg.init_std), name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    config: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix, kv_mask, segments):
        cfg = self.config
        dense = functools.partial(_dense, cfg)
        q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), "query")(x)
        k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), "key")(x)
        v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), "value")(x)
        q = layers.apply_rope(q, positions, theta=cfg.rope_theta)
        k = layers.apply_rope(k, positions, theta=cfg.rope_theta)
        names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        q, k, v = (_constrain(t, *names) for t in (q, k, v))
        attend = lambda mask=None, is_causal=False: layers.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=cfg.attention_impl)

        if self.decode:
            out = self._cached_attention(q, k, v, prefix, kv_mask)
        elif segment_ids is None and prefix is None:
            out = attend(is_causal=True)
        else:
            seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
            if prefix is None and segments is not None:
                out = attention.packed_causal_attention(
                    q, k, v, segment_ids=seg, info=segments, implementation=cfg.attention_impl)
            elif prefix is not None and segments is not None:
                out = prefix_attention.prefix_lm_attention(
                    q, k, v, segment_ids=seg, prefix=prefix, info=segments,
                    implementation=cfg.attention_impl)
            else:
                out = attend(mask=layers.make_attention_mask(
                    seg, seg, causal=True, query_prefix=prefix, kv_prefix=prefix))
        out = _constrain(out, *names)
        return dense(cfg.emb_dim, ("heads", "kv", "embed"), "out", axis=(-2, -1),
                     init=_output_init(cfg))(out)

    def _cached_attention(self, q, k, v, prefix, kv_mask):
        """Writes k/v at slots [index, index + len) and attends to every valid slot up to the query's."""
        cfg = self.config
        if kv_mask is None:
            raise ValueError("decode=True needs kv_mask [batch, cache_len] (valid cache slots)")
        initialized = self.has_variable("cache", "cached_key")
        cache_shape = (k.shape[0], kv_mask.shape[1]) + k.shape[2:]
        cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # cache creation (init): plain causal attention over the input
            return layers.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        i, length = index.value, q.shape[1]
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + length
        slots = jnp.arange(kv_mask.shape[1])
        q_slots = i + jnp.arange(length)
        visible = slots[None, None, :] <= q_slots[None, :, None]  # [1, len, cache_len]
        if prefix is not None:  # prefix tokens of this chunk see each other both ways
            kv_prefix = jax.lax.dynamic_update_slice(
                jnp.zeros(kv_mask.shape, bool), prefix.astype(bool), (0, i))
            visible = visible | (prefix.astype(bool)[:, :, None] & kv_prefix[:, None, :])
        mask = (visible & kv_mask.astype(bool)[:, None, :])[:, None]
        return layers.dot_product_attention(q, cached_k.value, cached_v.value, mask=mask,
                                            implementation=cfg.attention_impl)


class MLP(nn.Module):
    """SwiGLU feed-forward: wo(silu(wi_0 x) * wi_1 x)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(_dense, cfg)
        gate = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_0")(x)
        up = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_1")(x)
        h = _constrain(nn.silu(gate) * up, "activation_batch", "activation_length", "activation_mlp")
        return dense(cfg.emb_dim, ("mlp", "embed"), "wo", init=_output_init(cfg))(h)


class DecoderLayer(nn.Module):
    """One pre-norm block; returns (x, None) so the same class works under nn.scan."""

    config: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix, kv_mask, segments):
        cfg = self.config
        norm = lambda name: layers.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype),
                                           param_dtype=jnp.dtype(cfg.param_dtype), name=name)
        h = norm("pre_attention_norm")(x)
        x = x + Attention(cfg, decode=self.decode, name="attention")(
            h, positions, segment_ids, prefix, kv_mask, segments)
        x = x + MLP(cfg, name="mlp")(norm("pre_mlp_norm")(x))
        return _constrain(x, "activation_batch", "activation_length", "activation_embed"), None


def _layer_class(cfg: DecoderConfig):
    if cfg.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=checkpoint_policy(cfg.remat_policy),
                    prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """Token ids [batch, len] -> logits [batch, len, vocab] (in `config.dtype`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None, prefix: Array | None = None,
                 kv_mask: Array | None = None, decode: bool = False) -> Array:
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if tokens.ndim != 2:
            raise ValueError(f"Decoder expects token ids [batch, len], got shape {tokens.shape}")
        if positions is None:
            if decode:
                raise ValueError("decode=True needs explicit positions [batch, len]")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        segments, order = None, None
        if prefix is not None and segment_ids is None and not decode:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        tables = prefix is None or cfg.split_prefix_attention  # else the dense prefix-LM mask
        if segment_ids is not None and not decode and tables:
            groups = attention.batch_groups(tokens.shape[0])
            if cfg.sort_packed_rows and attention.uses_packed_kernel(
                    cfg.attention_impl, dt, cfg.head_dim):
                order = attention.sort_rows(segment_ids, groups)  # rows fit the segment table
                tokens, positions, segment_ids = (attention.permute_rows(a, order)
                                                  for a in (tokens, positions, segment_ids))
                if prefix is not None:
                    prefix = attention.permute_rows(prefix, order)
            if prefix is None:
                segments = attention.segment_info(segment_ids, cfg.max_segments_per_row,
                                                  groups=groups)
            else:
                segments = prefix_attention.prefix_info(segment_ids, prefix,
                                                        cfg.max_segments_per_row, groups=groups)

        embed = layers.Embed(num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=dt,
                             param_dtype=pdt, embedding_init=_normal(cfg.init_std),
                             grad=cfg.embedding_grad, name="token_embedder")
        x = _constrain(embed(tokens), "activation_batch", "activation_length", "activation_embed")
        args = (positions, segment_ids, prefix, kv_mask, segments)
        layer_cls = _layer_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True}, in_axes=(nn.broadcast,) * len(args),
                            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, decode=decode, name="layers")(x, *args)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, decode=decode, name=f"layers_{i}")(x, *args)
        if order is not None:
            x = attention.permute_rows(x, attention.inverse_order(order))
        x = layers.RMSNorm(epsilon=cfg.norm_eps, dtype=dt, param_dtype=pdt, name="decoder_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            std = (layers.readout_init_std(cfg.emb_dim) if cfg.logits_init_std is None
                   else cfg.logits_init_std)
            logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "logits_dense",
                            init=_normal(std))(x)
        return _constrain(logits, "activation_batch", "activation_length", "activation_vocab")


def model_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """Maps seqio decoder features onto Decoder.__call__ keyword arguments."""
    return dict(positions=batch.get("decoder_positions"),
                segment_ids=batch.get("decoder_segment_ids"),
                prefix=batch.get("decoder_causal_attention"))
