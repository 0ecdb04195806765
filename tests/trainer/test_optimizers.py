"""Schedules (warmup + cosine, rsqrt) at known steps; AdamW/Adafactor decrease a quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zhchat.trainer import optimizers


def test_warmup_then_cosine_values():
    s = optimizers.make_schedule(kind="cosine", peak_value=1e-3, warmup_steps=10,
                                 decay_steps=110, end_value_ratio=0.1)
    np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    # halfway through the 100 decay steps: end + (peak - end) * (1 + cos(pi/2)) / 2
    np.testing.assert_allclose(float(s(60)), 1e-4 + 9e-4 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), 1e-4, rtol=1e-5)


def test_rsqrt_and_constant():
    s = optimizers.make_schedule(kind="rsqrt", peak_value=1e-2, warmup_steps=100)
    np.testing.assert_allclose(float(s(50)), 5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(s(400)), 1e-2 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10000)), 1e-3, rtol=1e-6)
    c = optimizers.make_schedule(kind="constant", peak_value=2e-3, warmup_steps=4)
    np.testing.assert_allclose([float(c(i)) for i in (2, 4, 1000)], [1e-3, 2e-3, 2e-3], rtol=1e-6)
    with pytest.raises(ValueError, match="make_schedule.kind"):
        optimizers.make_schedule(kind="linear")


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_minimises_and_masks_decay(name):
    params = {"w": jnp.full((4, 3), 2.0), "scale": jnp.full((3,), 2.0)}
    tx = optimizers.make_optimizer(name=name, learning_rate=0.05, weight_decay=0.0, clip_norm=1.0)
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))  # noqa: E731
    first = float(loss(params))
    for _ in range(30):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * first
    assert optimizers.decay_mask(params) == {"w": True, "scale": False}


def test_weight_decay_applies_to_matrices_only():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = optimizers.make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.5,
                                   clip_norm=None)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.05, rtol=1e-6)  # -lr * wd * w
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0)


def test_unknown_optimizer_names_the_binding():
    with pytest.raises(ValueError, match="make_optimizer.name"):
        optimizers.make_optimizer(name="sgd")


def test_bf16_first_moment_stores_bf16_and_tracks_fp32_updates():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    grads = {"w": jnp.linspace(0.5, -0.3, 12).reshape(4, 3)}
    full = optimizers.make_optimizer(learning_rate=0.01, clip_norm=None)
    half = optimizers.make_optimizer(learning_rate=0.01, clip_norm=None, mu_dtype="bfloat16")
    s_full, s_half = full.init(params), half.init(params)
    for _ in range(3):
        u_full, s_full = full.update(grads, s_full, params)
        u_half, s_half = half.update(grads, s_half, params)
    mu = [x for x in jax.tree.leaves(s_half) if getattr(x, "shape", ()) == (4, 3)]
    assert sorted(str(x.dtype) for x in mu) == ["bfloat16", "float32"]  # mu bf16, nu fp32
    np.testing.assert_allclose(u_half["w"], u_full["w"], rtol=2e-2, atol=1e-5)
    with pytest.raises(ValueError, match="mu_dtype"):
        optimizers.make_optimizer(name="adafactor", mu_dtype="bfloat16")
