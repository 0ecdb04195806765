"""LLaMA-style decoder: packing, prefix LM, GQA, tied embeddings, scan/remat, loss bookkeeping."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import decoder as dec
from zhchat.models import layers
from zhchat.models.decoder_model import DecoderOnlyModel
from zhchat.models.losses import cross_entropy_with_logits

TINY = dec.DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, mlp_dim=64, dtype="float32")


def _init(cfg, length=8, seed=0):
    module = dec.Decoder(cfg)
    init = jax.jit(lambda rng: module.init(rng, jnp.ones((2, length), jnp.int32))["params"])
    return module, nn.unbox(init(jax.random.PRNGKey(seed)))


_JITTED = {}


def _fwd(module, params, tokens, **kwargs):
    """Jitted forward, one compile per module and input structure (eager applies are slow)."""
    if id(module) not in _JITTED:
        _JITTED[id(module)] = (module, jax.jit(lambda p, t, kw: module.apply({"params": p}, t, **kw)))
    return _JITTED[id(module)][1](params, tokens, kwargs)


def _tokens(shape, seed=0, vocab=61):
    return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, size=shape), jnp.int32)


def test_every_parameter_has_logical_axes_and_fp32():
    module = dec.Decoder(dataclasses.replace(TINY, dtype="bfloat16"))
    boxed = jax.jit(lambda r: module.init(r, jnp.ones((1, 4), jnp.int32))["params"])(
        jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(x.value.dtype == jnp.float32 and len(x.names) == x.value.ndim for x in leaves)
    logits = jax.jit(lambda p: module.apply({"params": p}, jnp.ones((1, 4), jnp.int32)))(boxed)
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 4, 61)


def test_packed_segments_do_not_attend_to_each_other_and_positions_restart():
    module, params = _init(TINY)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    a = _tokens((1, 8), seed=1)
    b = a.at[0, :3].set(jnp.array([7, 8, 9]))  # change segment 1 only
    run = jax.jit(lambda t, s=seg, p=pos: module.apply({"params": params}, t, positions=p,
                                                       segment_ids=s))
    la, lb = run(a), run(b)
    np.testing.assert_allclose(la[0, 3:7], lb[0, 3:7], atol=1e-6)
    assert not np.allclose(la[0, :3], lb[0, :3])
    # Segment 2 packed at offset 3 equals segment 2 alone at offset 0 (positions restart).
    alone = run(a[:, 3:7], jnp.ones((1, 4), jnp.int32), pos[:, 3:7])
    np.testing.assert_allclose(la[0, 3:7], alone[0], rtol=1e-5, atol=1e-5)


def test_unpacked_fast_path_matches_masked_path_on_real_tokens():
    module, params = _init(TINY)
    tokens = _tokens((2, 8), seed=2)
    seg = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
    assert bool(layers.unpacked_rows(seg)) and not bool(layers.unpacked_rows(seg.at[1, 6].set(2)))
    fast = _fwd(module, params, tokens, segment_ids=seg)  # lax.cond takes is_causal
    no_seg = _fwd(module, params, tokens)
    np.testing.assert_allclose(fast, no_seg, rtol=1e-5, atol=1e-5)
    # Force the dense-mask branch with a prefix of zeros (same causal semantics).
    masked = _fwd(module, params, tokens, segment_ids=seg, prefix=jnp.zeros_like(seg))
    np.testing.assert_allclose(fast[0], masked[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast[1, :5], masked[1, :5], rtol=1e-5, atol=1e-5)


def test_prefix_lm_prefix_is_bidirectional_and_targets_causal():
    module, params = _init(TINY)
    tokens = _tokens((1, 6), seed=3)
    prefix = jnp.array([[1, 1, 1, 0, 0, 0]])
    seg = jnp.ones((1, 6), jnp.int32)
    run = lambda t: _fwd(module, params, t, segment_ids=seg, prefix=prefix)
    base = run(tokens)
    later_prefix = run(tokens.at[0, 2].set(5 if tokens[0, 2] != 5 else 6))
    assert not np.allclose(base[0, 0], later_prefix[0, 0])  # position 0 sees prefix token 2
    later_target = run(tokens.at[0, 4].set(5 if tokens[0, 4] != 5 else 6))
    np.testing.assert_allclose(base[0, :4], later_target[0, :4], atol=1e-6)  # causal after prefix


def test_gqa_with_all_kv_heads_is_mha_and_repeated_kv_is_equivalent():
    mha_cfg = dataclasses.replace(TINY, num_kv_heads=4)
    module, params = _init(mha_cfg)
    tokens = _tokens((2, 8), seed=4)
    out = _fwd(module, params, tokens)
    # GQA with 2 kv heads equals MHA whose kv heads are the GQA heads repeated (query head h uses kv h//2).
    gqa_module, gqa_params = _init(TINY)
    rep = jax.tree_util.tree_map(lambda x: x, gqa_params)
    for i in range(2):
        att = rep[f"layers_{i}"]["attention"]
        for name in ("key", "value"):
            att[name]["kernel"] = jnp.repeat(att[name]["kernel"], 2, axis=1)
    np.testing.assert_allclose(_fwd(module, rep, tokens), _fwd(gqa_module, gqa_params, tokens),
                               rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 8, 61)


def test_tied_embeddings_share_the_table():
    module, params = _init(dataclasses.replace(TINY, tie_embeddings=True))
    assert "logits_dense" not in params
    tokens = _tokens((1, 5), seed=10)
    # Tied logits are the final hidden states against the embedding table, unscaled (HF Llama).
    logits, state = jax.jit(lambda p: module.apply({"params": p}, tokens, capture_intermediates=True,
                                                   mutable=["intermediates"]))(params)
    hidden = state["intermediates"]["decoder_norm"]["__call__"][0]
    emb = params["token_embedder"]["embedding"]
    np.testing.assert_allclose(logits, hidden @ emb.T, rtol=1e-5, atol=1e-5)
    _, untied = _init(TINY)
    assert untied["logits_dense"]["kernel"].shape == (32, 61)
    n_tied = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
    n_untied = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(untied))
    assert n_untied - n_tied == 32 * 61


def _stack_layers(params, num_layers):
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                     *[params[f"layers_{i}"] for i in range(num_layers)])
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = stacked
    return out


def test_scan_and_remat_match_unrolled_loss_and_grads():
    batch = {"decoder_input_tokens": _tokens((2, 8), 5), "decoder_target_tokens": _tokens((2, 8), 6),
             "decoder_loss_weights": jnp.ones((2, 8)).at[1, 6:].set(0),
             "decoder_segment_ids": jnp.array([[1] * 4 + [2] * 4, [1] * 6 + [0] * 2]),
             "decoder_positions": jnp.array([[0, 1, 2, 3, 0, 1, 2, 3], list(range(6)) + [0, 0]])}
    base = DecoderOnlyModel(config=TINY)
    params = nn.unbox(base.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (2, 8)}))
    grad_fn = lambda m, p: jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))(p)
    loss, grads = grad_fn(base, params)
    for scan, policy in ((True, "none"), (True, "dots_saveable"), (False, "full"),
                         (True, "dots_and_attention_saveable")):
        variant = DecoderOnlyModel(config=dataclasses.replace(TINY, scan_layers=scan,
                                                              remat_policy=policy))
        convert = (lambda t: _stack_layers(t, 2)) if scan else (lambda t: t)
        v_loss, v_grads = grad_fn(variant, convert(params))
        np.testing.assert_allclose(v_loss, loss, rtol=1e-6, err_msg=f"scan={scan} remat={policy}")
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                               v_grads, convert(grads))


def test_loss_ignores_padding_and_metrics_are_consistent():
    model = DecoderOnlyModel(config=TINY, z_loss=1e-3)
    params = model.init_params(jax.random.PRNGKey(1), {"decoder_input_tokens": (2, 8)})
    tokens, targets = _tokens((2, 8), 7), _tokens((2, 8), 8)
    weights = jnp.ones((2, 8)).at[1, 5:].set(0)
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": targets,
             "decoder_loss_weights": weights, "decoder_segment_ids": (weights > 0).astype(jnp.int32)}
    loss, metrics = model.loss_fn(params, batch, None)
    changed = dict(batch, decoder_target_tokens=targets.at[1, 5:].set(0))
    np.testing.assert_allclose(model.loss_fn(params, changed, None)[0], loss, rtol=1e-6)
    assert float(metrics["num_tokens"]) == 13.0
    np.testing.assert_allclose(metrics["loss"], metrics["cross_entropy"] + metrics["z_loss"], rtol=1e-6)
    logits = model.module.apply({"params": params}, tokens, segment_ids=batch["decoder_segment_ids"])
    lp = jax.nn.log_softmax(logits)
    ref_ce = -jnp.sum(jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * weights) / 13
    np.testing.assert_allclose(metrics["cross_entropy"], ref_ce, rtol=1e-5)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    scores = model.score_batch(params, batch)
    np.testing.assert_allclose(-jnp.sum(scores) / 13, ref_ce, rtol=1e-5)
    with pytest.raises(KeyError, match="decoder_loss_weights"):
        model.loss_fn(params, {"decoder_input_tokens": tokens, "decoder_target_tokens": targets}, None)


def test_label_smoothing_is_zero_for_a_perfect_prediction():
    logits = jnp.log(jnp.array([[[0.97, 0.01, 0.01, 0.01]]]))
    ce, _ = cross_entropy_with_logits(logits, jnp.array([[0]]), label_smoothing=0.03)
    np.testing.assert_allclose(ce, 0.0, atol=1e-5)
    ce_wrong, _ = cross_entropy_with_logits(logits, jnp.array([[1]]), label_smoothing=0.03)
    assert float(ce_wrong[0, 0]) > 1.0


def test_training_reduces_loss():
    model = DecoderOnlyModel(config=TINY)
    params = nn.unbox(model.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (4, 16)}))
    seq = _tokens((4, 17), 9)
    batch = {"decoder_input_tokens": seq[:, :-1], "decoder_target_tokens": seq[:, 1:],
             "decoder_loss_weights": jnp.ones((4, 16))}

    @jax.jit
    def step(p):
        loss, g = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(p)
        return loss, jax.tree_util.tree_map(lambda a, b: a - 0.05 * b, p, g)

    first, params = step(params)
    for _ in range(40):
        loss, params = step(params)
    assert float(loss) < 0.5 * float(first)


def test_bad_config_names_the_binding():
    with pytest.raises(ValueError, match="DecoderConfig.num_kv_heads"):
        dataclasses.replace(TINY, num_kv_heads=3)
    with pytest.raises(ValueError, match="DecoderConfig.remat_policy"):
        dataclasses.replace(TINY, remat_policy="sometimes")
