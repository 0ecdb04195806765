"""Splash attention (models/splash.py, the TPU kernel) in Pallas interpret mode on CPU: equal to the
masked XLA reference on packed rows with GQA, forward and backward; the decoder with
attention_impl="splash" equals the XLA decoder, unsharded and under shard_map on 8 CPU devices."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zhchat.models import attention, layers, splash
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel


def _seg(b, t):
    seg = np.ones((b, t), np.int32)
    seg[0, 40:] = 2
    seg[0, 90:] = 3
    seg[0, 120:] = 0  # padding
    return jnp.asarray(seg)


def test_splash_equals_masked_xla_with_segments_and_gqa():
    b, t, n, kv, h = 2, 128, 4, 2, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(kk, (b, t, kv, h)) for kk in keys[1:3])
    w = jax.random.normal(keys[3], (b, t, n, h))
    seg = _seg(b, t)
    mask = layers.make_attention_mask(seg, seg, causal=True)
    valid = (seg != 0)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v) * w, 0.0))
    fast = lambda q, k, v: splash.splash_causal_attention(q, k, v, segment_ids=seg)
    ref = lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(jnp.where(valid, fast(q, k, v), 0), jnp.where(valid, ref(q, k, v), 0),
                               atol=2e-5)
    g1 = jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g1, g2):
        np.testing.assert_allclose(a, r, atol=1e-4)
    assert layers.resolve_attention_impl("splash", jnp.float32, 128) == "splash"
    assert layers.resolve_attention_impl("splash", jnp.float32, 64) == "xla"
    assert layers.resolve_attention_impl("auto", jnp.float32, 128) != "splash"  # CPU: never auto
    with pytest.raises(ValueError, match="128"):
        splash.splash_causal_attention(q[:, :100], k[:, :100], v[:, :100])


CFG = DecoderConfig(vocab_size=64, emb_dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=128, mlp_dim=64, dtype="float32")
RULES = (("batch", ("data", "fsdp")), ("activation_batch", ("data", "fsdp")), ("embed", "fsdp"),
         ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("activation_mlp", "tensor"), ("activation_heads", "tensor"),
         ("activation_vocab", "tensor"))


def assert_splash_decoder_equals_xla(batch, cfg=CFG):
    """The decoder on splash equals the XLA decoder on `batch` (loss and every gradient),
    unsharded (the kernel called directly) and on a 2x2x2 mesh of 8 CPU devices (in shard_map)."""
    ref = DecoderOnlyModel(config=dataclasses.replace(cfg, attention_impl="xla"))
    fast = DecoderOnlyModel(config=dataclasses.replace(cfg, attention_impl="splash"))
    boxed = ref.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)})
    params = nn.unbox(boxed)
    vg = lambda m: jax.value_and_grad(lambda p, bt: m.loss_fn(p, bt, None)[0])
    loss, grads = jax.jit(vg(ref))(params, batch)
    f_loss, f_grads = jax.jit(vg(fast))(params, batch)
    np.testing.assert_allclose(f_loss, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), f_grads, grads)
    unsharded = str(jax.make_jaxpr(vg(fast))(params, batch))
    assert "pallas_call" in unsharded and "shard_map" not in unsharded

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        psh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        bsh = NamedSharding(mesh, P(("data", "fsdp")))
        step = jax.jit(vg(fast), in_shardings=(psh, bsh), out_shardings=(NamedSharding(mesh, P()), psh))
        jaxpr = str(jax.make_jaxpr(vg(fast))(params, batch))
        s_loss, s_grads = step(jax.device_put(params, psh), jax.device_put(batch, bsh))
    assert "shard_map" in jaxpr  # the kernel runs per shard
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), s_grads, grads)


def test_decoder_on_splash_equals_xla_sharded_and_not():
    b, t = 8, 128
    rng = np.random.default_rng(0)
    seg = np.asarray(_seg(b, t))
    pos = np.where(seg == 1, np.arange(t), 0)
    pos[0] = np.concatenate([np.arange(40), np.arange(50), np.arange(30), np.zeros(8, int)])
    batch = {"decoder_input_tokens": jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32),
             "decoder_target_tokens": jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32),
             "decoder_segment_ids": jnp.asarray(seg), "decoder_positions": jnp.asarray(pos),
             "decoder_loss_weights": jnp.asarray(seg > 0, jnp.float32)}
    assert_splash_decoder_equals_xla(batch)
    assert attention.batch_groups(b) == 1  # outside the mesh
