"""T5 v1.1 model: relative position buckets, preset sizes, logical axes, packing, dropout, dtypes."""

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import layers, t5, t5_layers
from zhchat.models.encdec_model import EncoderDecoderModel

TINY = dict(vocab_size=256, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
            num_decoder_layers=2, dtype="float32")
AXES = {"vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"}


def _model(**overrides):
    return EncoderDecoderModel(config=t5.T5Config(**{**TINY, **overrides}), z_loss=0.0)


def _params(model, seed=0):
    shapes = {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 7)}
    boxed = jax.jit(lambda rng: model.init_params(rng, shapes))(jax.random.PRNGKey(seed))
    return boxed, nn.unbox(boxed)


@pytest.fixture(scope="module")
def tiny():
    """(boxed, params) of the tiny config; dropout and dtype do not change parameter shapes."""
    return _params(_model())


def _apply(model):
    return jax.jit(model.module.apply)


# relative_position = key - query. Bidirectional, 32 buckets: 16 per direction, exact below 8, then
# 8 + floor(8 * log(n / 8) / log(128 / 8)) = 8 + floor(2 * log2(n / 8)), capped at 15; keys after
# the query add 16.
BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -22: 10, -23: 11, -24: 11, -32: 12,
                 -64: 14, -127: 15, -128: 15, -500: 15, 1: 17, 7: 23, 8: 24, 16: 26, 100: 31}
# Causal, 32 buckets: exact below 16, then 16 + floor(16 / 3 * log2(n / 16)), capped at 31; future
# keys -> 0.
CAUSAL = {0: 0, -1: 1, -15: 15, -16: 16, -18: 16, -19: 17, -32: 21, -45: 23, -64: 26, -100: 30,
          -127: 31, -128: 31, -1000: 31, 1: 0, 50: 0}


@pytest.mark.parametrize("table,bidirectional", [(BIDIRECTIONAL, True), (CAUSAL, False)])
def test_relative_position_buckets_match_hand_computed_table(table, bidirectional):
    rel = np.array(list(table), np.int32)
    got = t5_layers.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                             max_distance=128)
    np.testing.assert_array_equal(np.asarray(got), np.array(list(table.values())))


def test_relative_position_bias_module_uses_key_minus_query():
    module = t5_layers.RelativePositionBiases(num_heads=2, num_buckets=32, max_distance=128)
    pos = jnp.arange(5)
    variables = module.init(jax.random.PRNGKey(0), pos, pos)
    table = np.asarray(nn.unbox(variables)["params"]["rel_embedding"])
    bias = np.asarray(module.apply(variables, pos, pos))
    assert bias.shape == (1, 2, 5, 5)
    assert variables["params"]["rel_embedding"].names == ("heads", "relpos_buckets")
    np.testing.assert_allclose(bias[0, :, 1, 3], table[:, BIDIRECTIONAL[2] if 2 in BIDIRECTIONAL else 18])
    np.testing.assert_allclose(bias[0, :, 4, 0], table[:, 4])


@pytest.mark.parametrize("size,published", [("small", 77e6), ("base", 248e6), ("large", 783e6),
                                            ("xl", 2.85e9), ("xxl", 11.3e9)])
def test_presets_match_published_sizes(size, published):
    from zhchat.gin_configs import cli as gin_cli

    gin.clear_config()
    try:
        gin_cli.parse_gin([f"models/t5_{size}.gin"], [])
        model = gin_cli.evaluate_macro("MODEL")
    finally:
        gin.clear_config()
    assert model.config.vocab_size == 32128 and model.config.relpos_buckets == 32
    count = model.num_params()  # jax.eval_shape: nothing is allocated
    assert abs(count / published - 1) < 0.02, (size, count)


def test_every_parameter_has_logical_axes(tiny):
    boxed, params = tiny
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXES, leaf.names
    names = set(params)
    assert {"token_embedder", "logits_dense", "encoder_relpos", "decoder_relpos"} <= names
    assert params["logits_dense"]["kernel"].shape == (32, 256)  # untied output layer
    mlp = params["encoder_0"]["mlp"]
    assert set(mlp) == {"wi_0", "wi_1", "wo"}  # gated GELU, no biases anywhere
    assert not [p for p in jax.tree_util.tree_leaves_with_path(params) if "bias" in str(p[0])]


def _batch(rng, enc_len, dec_len, vocab=256, segments=None):
    enc = rng.integers(2, vocab, size=(1, enc_len)).astype(np.int32)
    tgt = rng.integers(2, vocab, size=(1, dec_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((1, 1), np.int32), tgt[:, :-1]], axis=1)
    return enc, dec_in, tgt


def test_packed_segments_equal_separate_examples(tiny):
    model, (_, params) = _model(), tiny
    rng = np.random.default_rng(0)
    a, b = _batch(rng, 5, 4), _batch(rng, 5, 4)
    pad_enc, pad_dec = 3, 2
    enc = np.concatenate([a[0], b[0], np.zeros((1, pad_enc), np.int32)], 1)
    dec_in = np.concatenate([a[1], b[1], np.zeros((1, pad_dec), np.int32)], 1)
    enc_seg = np.array([[1] * 5 + [2] * 5 + [0] * pad_enc], np.int32)
    dec_seg = np.array([[1] * 4 + [2] * 4 + [0] * pad_dec], np.int32)
    apply = _apply(model)
    packed = apply({"params": params}, enc, dec_in, enc_seg, dec_seg)
    for ex, dec_slice in ((a, slice(0, 4)), (b, slice(4, 8))):
        alone = apply({"params": params}, ex[0], ex[1])
        np.testing.assert_allclose(packed[:, dec_slice], alone, atol=2e-5, rtol=1e-4)


def test_dropout_only_with_rng(tiny):
    model, (_, params) = _model(dropout_rate=0.3), tiny
    rng = np.random.default_rng(1)
    enc, dec_in, tgt = _batch(rng, 8, 6)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}
    loss = jax.jit(model.loss_fn)
    l1, _ = loss(params, batch, None)
    l2, _ = loss(params, batch, None)
    l3, _ = loss(params, batch, jax.random.PRNGKey(1))
    l4, _ = loss(params, batch, jax.random.PRNGKey(2))
    assert float(l1) == float(l2) and float(l3) != float(l1) and float(l3) != float(l4)


def test_bf16_compute_with_fp32_params(tiny):
    _, params = tiny
    enc, dec_in, _ = _batch(np.random.default_rng(1), 8, 6)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = _apply(_model(dtype="bfloat16"))({"params": params}, enc, dec_in)
    ref = _apply(_model())({"params": params}, enc, dec_in)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.1)


def test_loss_metrics_and_scores(tiny):
    model, (_, params) = EncoderDecoderModel(config=t5.T5Config(**TINY), z_loss=1e-4), tiny
    rng = np.random.default_rng(2)
    enc, dec_in, tgt = _batch(rng, 8, 6)
    weights = np.ones_like(tgt, np.float32)
    weights[:, -2:] = 0
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": tgt, "decoder_loss_weights": weights}
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    assert set(metrics) >= {"loss", "z_loss", "accuracy", "num_tokens", "cross_entropy"}
    assert float(metrics["num_tokens"]) == 4.0
    assert np.isclose(float(loss), float(metrics["cross_entropy"] + metrics["z_loss"]))
    assert abs(float(metrics["cross_entropy"]) - np.log(256)) < 0.3  # near uniform at init
    logits = _apply(model)({"params": params}, enc, dec_in)
    logp = jax.nn.log_softmax(logits)[0, np.arange(6), tgt[0]]
    np.testing.assert_allclose(jax.jit(model.score_batch)(params, batch), [float(logp[:4].sum())],
                               rtol=1e-5)
    with pytest.raises(KeyError, match="encoder_input_tokens"):
        model.loss_fn(params, {k: v for k, v in batch.items() if k != "encoder_input_tokens"}, None)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="T5Config.d_model"):
        t5.T5Config(d_model=0)
    with pytest.raises(ValueError, match="T5Config.dtype"):
        t5.T5Config(dtype="float77")


@pytest.mark.parametrize("causal", [False, True])
def test_padding_lengths_path_equals_dense_mask(causal):
    """Unpacked rows (one example + padding) attend through sequence lengths; real positions and
    the parameter gradients equal the dense-mask path (which packed batches take)."""
    rng = np.random.default_rng(3)
    seg = np.array([[1] * 9 + [0] * 3, [1] * 12, [1] * 4 + [0] * 8], np.int32)
    x = jnp.asarray(rng.normal(size=(3, 12, 16)), jnp.float32)
    mask = layers.make_attention_mask(seg, seg, causal=causal)
    bias = t5_layers.RelativePositionBiases(num_heads=2, bidirectional=not causal).init_with_output(
        jax.random.PRNGKey(1), jnp.arange(12), jnp.arange(12))[0]
    attn = t5_layers.T5Attention(num_heads=2, head_dim=8)
    params = attn.init(jax.random.PRNGKey(0), x, None, mask=mask)["params"]
    lengths = t5_layers.padding_lengths(seg, seg)
    assert lengths.query.tolist() == [9, 12, 4] == lengths.kv.tolist()

    def loss(p, lens):
        out = attn.apply({"params": p}, x, None, mask=mask, bias=bias, lengths=lens, causal=causal)
        return jnp.sum(jnp.where(seg[..., None] > 0, out, 0.0) ** 2), out

    (l_fast, out_fast), g_fast = jax.value_and_grad(loss, has_aux=True)(params, lengths)
    (l_dense, out_dense), g_dense = jax.value_and_grad(loss, has_aux=True)(params, None)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out_fast)[real], np.asarray(out_dense)[real],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l_fast, l_dense, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_fast, g_dense)


def test_padding_lengths_floor_all_padding_rows_at_one():
    plain = np.array([[1, 1, 1, 0, 0]], np.int32)
    empty = t5_layers.padding_lengths(np.zeros((1, 5), np.int32), plain)
    assert empty.query.tolist() == [1] and empty.kv.tolist() == [3]


def _stack(params, name, n):
    layers_ = {f"{name}_{i}" for i in range(n)}
    out = {k: v for k, v in params.items() if k not in layers_}
    out[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                       *[params[f"{name}_{i}"] for i in range(n)])
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_scan_and_remat_match_unrolled_loss_and_grads(tiny, packed):
    """Scanned stacks (parameters with a leading "layers" axis) and remat policies give the
    unrolled model's loss and gradients, with dropout on (same rngs), packed or not."""
    base, (_, params) = _model(dropout_rate=0.2), tiny
    rng = np.random.default_rng(4)
    enc = rng.integers(2, 256, size=(2, 10)).astype(np.int32)
    tgt = rng.integers(2, 256, size=(2, 6)).astype(np.int32)
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1),
             "decoder_loss_weights": np.ones((2, 6), np.float32)}
    if packed:
        batch["encoder_segment_ids"] = np.array([[1] * 6 + [2] * 4] * 2, np.int32)
        batch["decoder_segment_ids"] = np.array([[1] * 3 + [2] * 3] * 2, np.int32)
    grad_fn = lambda m, p: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: m.loss_fn(p, batch, jax.random.PRNGKey(9))[0]))(p)
    loss, grads = grad_fn(base, params)
    stack = lambda t: _stack(_stack(t, "encoder", 2), "decoder", 2)  # noqa: E731
    for scan, policy in ((True, "none"), (True, "dots_with_no_batch_dims_saveable"),
                         (False, "full"), (True, "dots_and_attention_saveable")):
        variant = _model(dropout_rate=0.2, scan_layers=scan, remat_policy=policy)
        convert = stack if scan else (lambda t: t)
        v_loss, v_grads = grad_fn(variant, convert(params))
        if scan:  # scan splits the dropout rng per layer: different masks, same model otherwise
            no_drop = lambda m: dataclasses.replace(m.config, dropout_rate=0.0)  # noqa: E731
            v_loss, v_grads = grad_fn(EncoderDecoderModel(config=no_drop(variant), z_loss=0.0),
                                      convert(params))
            loss_nd, grads_nd = grad_fn(EncoderDecoderModel(config=no_drop(base), z_loss=0.0), params)
            np.testing.assert_allclose(v_loss, loss_nd, rtol=1e-5)
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                                   v_grads, convert(grads_nd))
        else:
            np.testing.assert_allclose(v_loss, loss, rtol=1e-6)
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                                   v_grads, grads)


def test_scanned_params_have_a_layers_axis_and_decode_like_unrolled(tiny):
    _, params = tiny
    scanned = _model(scan_layers=True, remat_policy="full")
    boxed = scanned.abstract_params()
    enc = boxed["encoder"]["attention"]["query"]["kernel"]
    assert enc.names[0] == "layers" and enc.value.shape[0] == 2
    stacked = _stack(_stack(params, "encoder", 2), "decoder", 2)
    tokens = np.random.default_rng(5).integers(2, 256, size=(2, 9)).astype(np.int32)
    tokens[1, 6:] = 0
    opts = dict(max_decode_length=5)
    want = _model().predict_batch(params, {"encoder_input_tokens": tokens}, None, **opts)
    got = scanned.predict_batch(stacked, {"encoder_input_tokens": tokens}, None, **opts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="remat_policy"):
        t5.T5Config(remat_policy="sometimes")


def test_unrolled_init_is_a_scanned_init_split_per_layer():
    """Unrolled stacks are initialised through a scanned twin (one initialiser per stacked weight):
    the same tree, shapes and logical names as the unrolled module's own init, and layer i holds
    slice i of the scanned init drawn from the same rng."""
    unrolled, scanned = _model(), _model(scan_layers=True)
    shapes = {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 7)}
    rng = jax.random.PRNGKey(3)
    got = unrolled.init_params(rng, shapes)
    own = jax.eval_shape(lambda: unrolled.module.init(
        rng, jnp.ones((2, 12), jnp.int32), jnp.ones((2, 7), jnp.int32))["params"])
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert (jax.tree_util.tree_structure(got, is_leaf=is_box)
            == jax.tree_util.tree_structure(own, is_leaf=is_box))
    for a, b in zip(jax.tree_util.tree_leaves(got, is_leaf=is_box),
                    jax.tree_util.tree_leaves(own, is_leaf=is_box)):
        assert a.names == b.names and a.value.shape == b.value.shape
    stacked = scanned.init_params(rng, shapes)
    for i in range(2):
        np.testing.assert_array_equal(
            got[f"decoder_{i}"]["mlp"]["wo"]["kernel"].value,
            stacked["decoder"]["mlp"]["wo"]["kernel"].value[i])
    direct = unrolled.module.init(rng, jnp.ones((2, 12), jnp.int32),
                                  jnp.ones((2, 7), jnp.int32))["params"]
    for path in (("encoder_1", "attention", "query", "kernel"), ("decoder_0", "mlp", "wi_0", "kernel")):
        a, b = got, direct
        for k in path:
            a, b = a[k], b[k]
        assert float(jnp.std(a.value)) == pytest.approx(float(jnp.std(b.value)), rel=0.15), path
