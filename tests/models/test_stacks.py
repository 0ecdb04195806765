"""Unrolled models initialise through their scanned twin, split per layer (models/stacks.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import stacks
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel

CFG = DecoderConfig(vocab_size=61, emb_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, dtype="float32")
is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731


def test_unrolled_decoder_init_is_the_scanned_init_split():
    unrolled = DecoderOnlyModel(config=CFG)
    scanned = DecoderOnlyModel(config=dataclasses.replace(CFG, scan_layers=True))
    shapes, rng = {"decoder_input_tokens": (2, 8)}, jax.random.PRNGKey(7)
    got = unrolled.init_params(rng, shapes)
    own = unrolled.module.init(rng, jnp.ones((2, 8), jnp.int32))["params"]  # per-layer initialisers
    assert (jax.tree_util.tree_structure(got, is_leaf=is_box)
            == jax.tree_util.tree_structure(own, is_leaf=is_box))
    for a, b in zip(jax.tree_util.tree_leaves(got, is_leaf=is_box),
                    jax.tree_util.tree_leaves(own, is_leaf=is_box)):
        assert a.names == b.names and a.value.shape == b.value.shape and a.value.dtype == b.value.dtype
        if a.value.size >= 512:  # same distribution as the per-layer initialisers
            assert float(jnp.std(a.value)) == pytest.approx(float(jnp.std(b.value)), rel=0.15)
    stacked = scanned.init_params(rng, shapes)
    for i in range(CFG.num_layers):
        np.testing.assert_array_equal(got[f"layers_{i}"]["mlp"]["wo"]["kernel"].value,
                                      stacked["layers"]["mlp"]["wo"]["kernel"].value[i])
    np.testing.assert_array_equal(got["token_embedder"]["embedding"].value,
                                  stacked["token_embedder"]["embedding"].value)


def test_split_stacks_plain_and_boxed_and_rejects_unscanned():
    plain = {"layers": {"w": jnp.arange(6.0).reshape(3, 2)}, "head": jnp.ones(2)}
    out = stacks.split_stacks(plain, {"layers": 3})
    assert sorted(out) == ["head", "layers_0", "layers_1", "layers_2"]
    np.testing.assert_array_equal(out["layers_2"]["w"], [4.0, 5.0])
    boxed = {"layers": {"w": nn.Partitioned(jnp.zeros((3, 2)), names=("layers", "embed"))}}
    assert stacks.split_stacks(boxed, {"layers": 3})["layers_1"]["w"].names == ("embed",)
    unscanned = {"layers": {"w": nn.Partitioned(jnp.zeros((3, 2)), names=("embed", "mlp"))}}
    with pytest.raises(ValueError, match="expected a scanned parameter"):
        stacks.split_stacks(unscanned, {"layers": 3})
