"""GPU-only checks of the attention dispatch: cuDNN flash attention matches XLA (skipped on CPU).

Marked `gpu`: on the GPU machine all GPU tests run with
`JAX_PLATFORMS=cuda python -m pytest -m gpu tests` (docs/benchmarks.md).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import layers
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                                 reason="needs a GPU (cuDNN flash attention)")]
CFG = DecoderConfig(vocab_size=256, emb_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, mlp_dim=512, dtype="bfloat16", attention_impl="auto")


def _qkv(b=2, t=256, n=8, k=2, h=64):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(kk, (b, t, heads, h), jnp.bfloat16)
            for kk, heads in zip(keys, (n, k, k))]


def test_cudnn_attention_matches_xla_causal_and_masked():
    assert layers.resolve_attention_impl("auto", jnp.bfloat16, 64) == "cudnn"
    q, k, v = _qkv()
    run = lambda impl, **kw: jax.jit(lambda q, k, v: layers.dot_product_attention(
        q, k, v, implementation=impl, **kw))(q, k, v).astype(jnp.float32)
    np.testing.assert_allclose(run("cudnn", is_causal=True), run("xla", is_causal=True), atol=2e-2)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 64, axis=1).repeat(2, 0))
    mask = layers.make_attention_mask(seg, seg, causal=True)
    np.testing.assert_allclose(run("cudnn", mask=mask), run("xla", mask=mask), atol=2e-2)
    hlo = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, is_causal=True)).lower(
        q, k, v).as_text()
    assert "cudnn" in hlo.lower()


def _batch(packed):
    rng = np.random.RandomState(0)
    seg = np.ones((4, 256), np.int32)
    pos = np.broadcast_to(np.arange(256), (4, 256)).copy()
    if packed:
        seg[:, 100:] = 2
        pos[:, 100:] -= 100
    return {"decoder_input_tokens": jnp.asarray(rng.randint(2, 256, (4, 256)), jnp.int32),
            "decoder_target_tokens": jnp.asarray(rng.randint(2, 256, (4, 256)), jnp.int32),
            "decoder_segment_ids": jnp.asarray(seg), "decoder_positions": jnp.asarray(pos),
            "decoder_loss_weights": jnp.ones((4, 256), jnp.float32)}


@pytest.mark.parametrize("packed", [False, True])
def test_decoder_loss_and_grads_cudnn_match_xla(packed):
    fast = DecoderOnlyModel(config=CFG)
    ref = DecoderOnlyModel(config=dataclasses.replace(CFG, attention_impl="xla"))
    params = nn.unbox(fast.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
    batch = _batch(packed)
    vg = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))
    (l1, g1), (l2, g2) = vg(fast)(params), vg(ref)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-2)
    flat1, flat2 = jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)
    for a, b in zip(flat1, flat2):
        np.testing.assert_allclose(a, b, atol=5e-2 * float(jnp.max(jnp.abs(b))) + 1e-6)
    hlo = jax.jit(lambda p: fast.loss_fn(p, batch, None)[0]).lower(params).as_text().lower()
    assert "cudnn" in hlo


def test_gpu_kv_cache_decoding_matches_xla():
    fast = DecoderOnlyModel(config=CFG, eos_id=None)
    ref = DecoderOnlyModel(config=dataclasses.replace(CFG, attention_impl="xla", dtype="float32"),
                           eos_id=None)
    params = nn.unbox(fast.init_params(jax.random.PRNGKey(1), {"decoder_input_tokens": (1, 8)}))
    prompts = jnp.array([[5, 9, 14, 0, 0, 0, 0, 0], [7, 3, 22, 40, 11, 2, 9, 4]])
    a = fast.predict_batch(params, {"decoder_input_tokens": prompts}, jax.random.PRNGKey(0),
                           max_decode_length=8)
    b = ref.predict_batch(params, {"decoder_input_tokens": prompts}, jax.random.PRNGKey(0),
                          max_decode_length=8)
    assert a.shape == (2, 8)
    assert np.mean(np.asarray(a) == np.asarray(b)) > 0.5  # bf16 vs fp32 may flip late argmaxes


def test_attention_saving_remat_runs_each_attention_forward_once():
    """"dots_with_no_batch_dims_saveable" recomputes cuDNN's attention forward in the backward
    pass (the fused kernel is not a dot); "dots_and_attention_saveable" keeps its outputs."""
    batch = {k: v for k, v in _batch(False).items()  # unpacked: the static causal path
             if k not in ("decoder_segment_ids", "decoder_positions")}

    def forward_calls(policy):
        cfg = dataclasses.replace(CFG, remat_policy=policy)
        model = DecoderOnlyModel(config=cfg)
        params = nn.unbox(model.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
        fn = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))
        hlo = fn.lower(params).compile().as_text()
        return hlo.count('custom_call_target="__cudnn$fmhaSoftmax"'), fn(params)

    (recomputed, (l1, g1)), (saved, (l2, g2)) = (forward_calls("dots_with_no_batch_dims_saveable"),
                                                 forward_calls("dots_and_attention_saveable"))
    assert recomputed == 2 * CFG.num_layers and saved == CFG.num_layers
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        # bf16 recomputation reorders sums: ~2% on single small entries, ~1e-3 over a tensor
        np.testing.assert_allclose(a, b, atol=5e-2 * float(jnp.max(jnp.abs(b))) + 1e-6)
        assert float(jnp.linalg.norm(a - b)) <= 1e-2 * float(jnp.linalg.norm(b)) + 1e-6
