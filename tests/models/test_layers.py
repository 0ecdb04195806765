"""Shared layers: numbers against numpy references, logical axis names on every parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import layers


def _naive_attention(q, k, v, mask=None, bias=None):
    """Reference softmax attention with explicit K/V head repetition for GQA."""
    n, kh = q.shape[2], k.shape[2]
    k = np.repeat(k, n // kh, axis=2)
    v = np.repeat(v, n // kh, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_rmsnorm_matches_numpy_and_names_axis():
    x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
    norm = layers.RMSNorm(epsilon=1e-6)
    variables = norm.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["scale"].names == ("embed",)
    y = norm.apply(variables, x)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_dense_general_multi_axis_and_fan_in_init():
    x = np.random.RandomState(1).randn(4, 5, 6, 16).astype(np.float32)  # [b, l, heads, kv]
    dense = layers.DenseGeneral(features=32, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"))
    variables = dense.init(jax.random.PRNGKey(0), x)
    kernel = variables["params"]["kernel"]
    assert kernel.names == ("heads", "kv", "embed") and kernel.value.shape == (6, 16, 32)
    y = dense.apply(variables, x)
    np.testing.assert_allclose(y, np.einsum("blhk,hke->ble", x, kernel.value), rtol=1e-5, atol=1e-5)
    # fan-in is 6 * 16 = 96 (not 16): truncated normal std ~ 1/sqrt(96).
    big = layers.DenseGeneral(features=512, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"))
    std = float(jnp.std(big.init(jax.random.PRNGKey(1), x)["params"]["kernel"].value))
    assert 0.8 / np.sqrt(96) < std < 1.2 / np.sqrt(96)
    with pytest.raises(ValueError, match="kernel_axes"):
        layers.DenseGeneral(features=8, kernel_axes=("embed",)).init(jax.random.PRNGKey(0), x)


def test_embed_lookup_and_attend():
    emb = layers.Embed(num_embeddings=11, features=4)
    ids = jnp.array([[1, 5, 10]])
    variables = emb.init(jax.random.PRNGKey(0), ids)
    table = variables["params"]["embedding"]
    assert table.names == ("vocab", "embed")
    np.testing.assert_allclose(emb.apply(variables, ids), table.value[ids])
    q = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(emb.apply(variables, q, method=emb.attend), q @ table.value.T,
                               rtol=1e-5)


def test_rope_is_a_rotation_depending_only_on_relative_position():
    rng = np.random.RandomState(2)
    q = rng.randn(1, 1, 1, 8).astype(np.float32)
    k = rng.randn(1, 1, 1, 8).astype(np.float32)
    pos = lambda p: jnp.array([[p]])
    dots = [float(jnp.sum(layers.apply_rope(q, pos(a)) * layers.apply_rope(k, pos(b))))
            for a, b in ((3, 1), (10, 8), (102, 100))]
    np.testing.assert_allclose(dots, [dots[0]] * 3, rtol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, pos(7))), np.linalg.norm(q),
                               rtol=1e-5)
    np.testing.assert_allclose(layers.apply_rope(q, pos(0)), q)  # position 0 is the identity
    # Half-split layout: dims (i, i + d/2) rotate together by angle p * theta^(-2i/d).
    out = layers.apply_rope(q, pos(5))[0, 0, 0]
    ang = 5 * layers.rope_frequencies(8)
    x1, x2 = q[0, 0, 0, :4], q[0, 0, 0, 4:]
    np.testing.assert_allclose(out[:4], x1 * np.cos(ang) - x2 * np.sin(ang), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_naive_reference_gqa_mask_bias(num_kv_heads):
    rng = np.random.RandomState(3)
    b, t, n, h = 2, 5, 4, 8
    q = rng.randn(b, t, n, h).astype(np.float32)
    k = rng.randn(b, t, num_kv_heads, h).astype(np.float32)
    v = rng.randn(b, t, num_kv_heads, h).astype(np.float32)
    bias = rng.randn(1, n, t, t).astype(np.float32)
    seg = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    mask = np.asarray(layers.make_attention_mask(seg, seg, causal=True))
    out = layers.dot_product_attention(q, k, v, mask=mask, bias=bias)
    np.testing.assert_allclose(out, _naive_attention(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)
    causal = layers.dot_product_attention(q, k, v, is_causal=True)
    tril = np.tril(np.ones((t, t), bool))[None, None]
    np.testing.assert_allclose(causal, _naive_attention(q, k, v, tril), rtol=1e-5, atol=1e-5)


def test_make_attention_mask_segments_causal_prefix():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    prefix = jnp.array([[1, 1, 0, 1, 0, 0]])
    m = np.asarray(layers.make_attention_mask(seg, seg, causal=True, query_prefix=prefix,
                                              kv_prefix=prefix))[0, 0]
    expected = np.array([
        [1, 1, 0, 0, 0, 0],  # prefix token 0 sees prefix token 1 (bidirectional)
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # target token: causal
        [0, 0, 0, 1, 0, 0],  # segment 2 starts: nothing from segment 1
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only padding
    ], bool)
    np.testing.assert_array_equal(m, expected)


def test_attention_implementation_resolution_falls_back_on_cpu():
    assert layers.resolve_attention_impl("auto", jnp.bfloat16, 128) == "xla"  # no GPU here
    assert layers.resolve_attention_impl("cudnn", jnp.bfloat16, 128) == "xla"
    with pytest.raises(ValueError, match="implementation"):
        layers.resolve_attention_impl("flash", jnp.bfloat16, 128)
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    out = layers.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
    assert out.shape == q.shape and out.dtype == jnp.bfloat16


def test_one_hot_embedding_gradient_equals_the_scatter_gradient():
    """Repeated ids (as real text has): the one-hot matmul gradient, over several chunks with a
    padded last one, equals XLA's scatter-add gradient."""
    from zhchat.models import layers as L

    table = jax.random.normal(jax.random.PRNGKey(0), (50, 8))
    ids = jnp.asarray(np.random.default_rng(0).choice([0, 0, 0, 3, 7, 49], size=(3, 37)))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 37, 8))
    loss = lambda take: lambda t: jnp.sum(take(t) * w)  # noqa: E731
    want = jax.grad(loss(lambda t: jnp.take(t, ids, axis=0)))(table)
    got = jax.jit(jax.grad(loss(lambda t: L.one_hot_grad_take(t, ids, 16))))(table)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(L.one_hot_grad_take(table, ids, 16), table[ids])
    emb = L.Embed(num_embeddings=50, features=8, grad="one_hot", grad_chunk=16)
    params = emb.init(jax.random.PRNGKey(2), ids)
    g1 = jax.grad(lambda p: jnp.sum(emb.apply(p, ids) * w))(params)
    g2 = jax.grad(lambda p: jnp.sum(L.Embed(num_embeddings=50, features=8).apply(p, ids) * w))(
        params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)
