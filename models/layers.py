"""Shared flax layers with logical axis names: RMSNorm, DenseGeneral, Embed, RoPE and attention.

Used by the LLaMA-style decoder (models/decoder.py) and the T5 v1.1 encoder-decoder (models/t5.py).
Every parameter is created through `nn.with_logical_partitioning`, so the trainer can map the logical
names (docs/architecture.md) onto any mesh. Parameters live in `param_dtype` (fp32); matmuls run in
`dtype` (bf16 on accelerators).

`dot_product_attention` is the single attention entry point. It calls `jax.nn.dot_product_attention`
with cuDNN flash attention on GPU and XLA elsewhere, and falls back to XLA when cuDNN cannot take the
inputs (fp32, head dim not a multiple of 8 or above 256, no GPU). Pure causal attention should be
requested with `is_causal=True` and no mask, which cuDNN runs without materialising a [T, S] mask.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def readout_init_std(width: int) -> float:
    """Std of an untied output layer's kernel: 0.5 / sqrt(width), so the initial logits have std
    0.5 at any width and the initial cross-entropy is about ln(vocab) + 0.125 (a std-1 readout
    starts 0.5 nats above ln(vocab), HF T5's std-1.0 one hundreds of nats)."""
    return 0.5 / float(np.sqrt(width))
# "pallas": T5's biased self-attention through models/bucket_attention.py; elsewhere as "auto"
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "pallas")


def _canonical_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias), computed in fp32."""

    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    scale_axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, self.scale_axes),
            (features,), self.param_dtype)
        x32 = jnp.asarray(x, jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * jnp.asarray(scale, jnp.float32)).astype(self.dtype)


class DenseGeneral(nn.Module):
    """A linear map over `axis` of the input to `features`, with logical names on the kernel.

    `kernel_axes` names the kernel dimensions: the contracted input axes first, then `features`.
    The kernel is initialised as a 2-D [prod(in), prod(out)] matrix (correct fan-in) and reshaped.
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    kernel_axes: tuple[str, ...] = ()
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Initializer = default_kernel_init
    use_bias: bool = False
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = _canonical_axes(self.axis, x.ndim)
        in_shape = tuple(x.shape[a] for a in axes)
        kernel_shape = in_shape + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} must name all "
                             f"{len(kernel_shape)} kernel dimensions {kernel_shape}")

        def init(rng, shape, dtype):
            flat = (int(np.prod(in_shape)), int(np.prod(features)))
            return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            kernel_shape, self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        contract = (axes, tuple(range(len(axes))))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                self.bias_init, self.kernel_axes[len(axes):]), features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


EMBEDDING_GRADS = ("scatter", "one_hot")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def one_hot_grad_take(table: Array, ids: Array, chunk: int) -> Array:
    """`table[ids]` whose table gradient is a one-hot matmul (chunks of `chunk` tokens, fp32
    accumulation) instead of XLA's scatter-add: on real text the scatter's atomics collide on
    frequent ids (padding and BOS 0, punctuation) and serialise."""
    return jnp.take(table, ids, axis=0)


def _one_hot_take_fwd(table, ids, chunk):
    return jnp.take(table, ids, axis=0), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _one_hot_take_bwd(chunk, residuals, g):
    ids, shape_of_table = residuals
    vocab, dtype = shape_of_table.shape[0], shape_of_table.dtype
    flat_ids, flat_g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
    n = flat_ids.shape[0]
    steps = -(-n // chunk)
    pad = steps * chunk - n
    flat_ids = jnp.pad(flat_ids, (0, pad), constant_values=-1)  # -1: a zero one-hot row
    flat_g = jnp.pad(flat_g, ((0, pad), (0, 0)))

    def body(acc, xs):
        i, gc = xs
        hot = jax.nn.one_hot(i, vocab, dtype=gc.dtype)
        return acc + jnp.einsum("nv,nd->vd", hot, gc, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(body, jnp.zeros((vocab, g.shape[-1]), jnp.float32),
                          (flat_ids.reshape(steps, chunk), flat_g.reshape(steps, chunk, -1)))
    return acc.astype(dtype), None


one_hot_grad_take.defvjp(_one_hot_take_fwd, _one_hot_take_bwd)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` computes logits against it (tied output).
    `grad="one_hot"` computes the table's gradient as a one-hot matmul (`one_hot_grad_take`)."""

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
    axes: tuple[str, str] = ("vocab", "embed")
    grad: str = "scatter"
    grad_chunk: int = 8192

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{self.name}: token ids must be integers, got {ids.dtype}")
        table = jnp.asarray(self.embedding, self.dtype)
        if self.grad == "one_hot":
            return one_hot_grad_take(table, ids, self.grad_chunk)
        if self.grad != "scatter":
            raise ValueError(f"{self.name}: grad must be one of {EMBEDDING_GRADS}, got {self.grad!r}")
        return jnp.take(table, ids, axis=0)

    def attend(self, query: Array) -> Array:
        """Logits of `query` [..., features] against every embedding: [..., num_embeddings]."""
        emb = jnp.asarray(self.embedding, self.dtype)
        return jnp.einsum("...e,ve->...v", jnp.asarray(query, self.dtype), emb)


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Inverse frequencies theta^(-2i/d) for i < d/2 (LLaMA / RoFormer)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def apply_rope(x: Array, positions: Array, *, theta: float = 10000.0) -> Array:
    """Rotary position embedding of x [batch, len, heads, head_dim] at integer positions [batch, len].

    Uses the half-split layout (first half of the head dim pairs with the second half, as in
    HF LLaMA after its q/k permutation); computed in fp32 and cast back to x's dtype.
    """
    head_dim = x.shape[-1]
    inv_freq = jnp.asarray(rope_frequencies(head_dim, theta), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, d/2]
    sin = jnp.sin(angles)[..., None, :]
    cos = jnp.cos(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def make_attention_mask(query_segment_ids: Array, kv_segment_ids: Array, *, causal: bool = False,
                        query_positions: Array | None = None, kv_positions: Array | None = None,
                        query_prefix: Array | None = None, kv_prefix: Array | None = None) -> Array:
    """Boolean mask [batch, 1, q_len, kv_len]: True where a query may attend to a key.

    Keys are visible only within the same segment (segment id 0 is padding and matches only padding).
    With `causal`, a query sees keys at index <= its own (or, if positions are given, at position
    <= its own). `query_prefix`/`kv_prefix` (1 on prefix-LM inputs) let prefix tokens of one segment
    see each other bidirectionally.
    """
    mask = query_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        if query_positions is None:
            q_idx = jnp.arange(query_segment_ids.shape[1])[None, :, None]
            kv_idx = jnp.arange(kv_segment_ids.shape[1])[None, None, :]
        else:
            q_idx, kv_idx = query_positions[:, :, None], kv_positions[:, None, :]
        visible = kv_idx <= q_idx
        if query_prefix is not None:
            visible = visible | (query_prefix[:, :, None].astype(bool) & kv_prefix[:, None, :].astype(bool))
        mask = mask & visible
    return mask[:, None, :, :]


def unpacked_rows(segment_ids: Array) -> Array:
    """True (scalar) when every row is one segment followed only by padding: ids 1..1 0..0."""
    lengths = jnp.sum(segment_ids != 0, axis=1, keepdims=True)
    expected = (jnp.arange(segment_ids.shape[1])[None, :] < lengths).astype(segment_ids.dtype)
    return jnp.all(segment_ids == expected)


@functools.lru_cache(maxsize=None)
def _gpu_available() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _tpu_available() -> bool:
    try:
        return jax.default_backend() == "tpu"
    except RuntimeError:
        return False


def resolve_attention_impl(implementation: str, dtype: DType, head_dim: int) -> str:
    """Picks "cudnn", "splash" or "xla". cuDNN flash attention needs a GPU, bf16/fp16 and
    head_dim % 8 == 0, head_dim <= 256 (Hopper); splash (models/splash.py) head_dim % 128 == 0,
    chosen by "auto" on TPU and run in interpret mode elsewhere when asked for; anything else runs
    on XLA (also when the kernel asked for cannot take the inputs)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation == "xla":
        return "xla"
    if implementation == "pallas":  # the T5 bucket kernel is chosen by the T5 model itself
        implementation = "auto"
    if implementation == "splash" or (implementation == "auto" and _tpu_available()):
        return "splash" if head_dim % 128 == 0 else "xla"
    cudnn_ok = (_gpu_available() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 256)
    return "cudnn" if cudnn_ok else "xla"


def dot_product_attention(query: Array, key: Array, value: Array, *, bias: Array | None = None,
                          mask: Array | None = None, is_causal: bool = False,
                          query_seq_lengths: Array | None = None,
                          key_value_seq_lengths: Array | None = None,
                          implementation: str = "auto", scale: float | None = None) -> Array:
    """Multi-head / grouped-query attention over [batch, len, heads, head_dim] inputs.

    query [b, t, n, h]; key/value [b, s, k, h] with n a multiple of k (GQA). `mask` is boolean,
    broadcastable to [b, n, t, s]; `bias` is additive (e.g. T5 relative positions). `is_causal`
    applies a top-left aligned causal mask (query i sees keys j <= i). Sequence lengths mark
    right-padding. Returns [b, t, n, h] in the query's dtype. The softmax runs in fp32 on XLA.
    """
    impl = resolve_attention_impl(implementation, query.dtype, query.shape[-1])
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    for name, lengths in (("query_seq_lengths", query_seq_lengths),
                          ("key_value_seq_lengths", key_value_seq_lengths)):
        if lengths is not None and lengths.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {lengths.dtype}")
    kwargs = dict(bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                  query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths)
    if impl == "splash":
        from zhchat.models import splash
        if (is_causal and mask is None and bias is None and query_seq_lengths is None
                and key_value_seq_lengths is None and query.shape[1] == key.shape[1]
                and splash.supported(query.shape[1], query.shape[-1])):
            return splash.splash_causal_attention(query, key, value)
        warn_once(f"splash attention takes causal self-attention without masks or biases of "
                  f"lengths % 128 == 0; {query.shape} q / {key.shape} kv (bias={bias is not None}, "
                  f"mask={mask is not None}) uses XLA attention")
    if impl == "cudnn":
        dtype = query.dtype
        if bias is not None:
            kwargs["bias"] = bias.astype(dtype)
        try:
            return jax.nn.dot_product_attention(query, key.astype(dtype), value.astype(dtype),
                                                implementation="cudnn", **kwargs)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            # shapes/masks cuDNN rejects at trace time run on XLA, said once per kind of rejection
            warn_once(f"cuDNN attention rejected {query.shape} q / {key.shape} kv "
                       f"(bias={bias is not None}, mask={mask is not None}, causal={is_causal}): "
                       f"{e}; using XLA attention")
    return _xla_attention(query, key, value, **kwargs)


def kernel_mesh_axes(*head_counts: int):
    """(mesh, batch axes, head axes) for running a Pallas kernel under `shard_map` over the
    active mesh's activation axes ("activation_batch", "activation_heads"); head axes only when
    they divide every count in `head_counts`. (None, None, None) without a mesh of several devices
    (a Pallas kernel is not partitioned by XLA, so it runs per shard on its local rows)."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
        batch = nn.logical_to_mesh_axes(("activation_batch",))[0]
        heads = nn.logical_to_mesh_axes(("activation_heads",))[0]
    except (ValueError, RuntimeError, AttributeError):
        return None, None, None
    if mesh is None or getattr(mesh, "empty", True) or math.prod(dict(mesh.shape).values()) == 1:
        return None, None, None
    size = lambda axes: math.prod(dict(mesh.shape).get(a, 1)  # noqa: E731
                                  for a in ((axes,) if isinstance(axes, str) else axes or ()))
    if heads is not None and any(n % size(heads) for n in head_counts):
        heads = None
    return mesh, batch, heads


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Logs `message` the first time it is seen."""
    logging.warning(message)


def _xla_attention(query, key, value, *, bias, mask, **kwargs):
    """jax.nn's XLA path; it computes logits and the softmax in fp32 for every input dtype."""
    dtype = query.dtype
    bias = None if bias is None else bias.astype(jnp.promote_types(dtype, jnp.float32))
    return jax.nn.dot_product_attention(query, key.astype(dtype), value.astype(dtype), bias=bias,
                                        mask=mask, implementation="xla", **kwargs)
