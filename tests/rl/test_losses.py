"""GAE against a hand computation; PPO, reward-model and DPO losses against their formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.rl import gae, kl_controller, losses


def test_gae_matches_hand_computation():
    rewards = jnp.array([[1.0, 0.0, 2.0, 0.0]])
    values = jnp.array([[0.5, 1.0, 1.5, 9.0]])  # the 4th token is padding: its value is ignored
    mask = jnp.array([[1, 1, 1, 0]])
    g, lam = 0.9, 0.8
    d2 = 2.0 - 1.5                      # last real token: no bootstrap
    d1 = 0.0 + g * 1.5 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae.gae(rewards, values, mask, gamma=g, lam=lam)
    np.testing.assert_allclose(adv[0], [a0, a1, a2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0], rtol=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, _ = gae.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma=1.0, lam=1.0)
    for b in range(3):
        n = mask[b].sum()
        expected = [r[b, t:n].sum() - v[b, t] for t in range(n)] + [0.0] * (5 - n)
        np.testing.assert_allclose(adv[b], expected, rtol=1e-5, atol=1e-6)


def test_whiten_over_mask():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    w = gae.whiten(x, jnp.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(w[0, :3], np.array([-1, 0, 1]) / np.sqrt(2 / 3), rtol=1e-5)
    assert float(w[0, 3]) == 0.0


def test_clipped_policy_loss_formula():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 0.7]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -2.0, 3.0, -1.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, m = losses.clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0: ratio 1.5, A>0 -> clipped to 1.2: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 0.5, A<0 -> max(1.0, 2*0.8=1.6) = 1.6 (clipped)
    # token 2: ratio 1.1 inside: -3.3
    np.testing.assert_allclose(float(loss), (-1.2 + 1.6 - 3.3) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_fraction"]), 2 / 3, rtol=1e-6)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    np.testing.assert_allclose(float(m["approx_kl"]), np.mean(k3), rtol=1e-5)


def test_clipped_value_loss_formula():
    v, old, ret = jnp.array([[2.0, 0.0, 1.0]]), jnp.array([[1.0, 1.0, 1.0]]), jnp.array([[0.0, 0.5, 1.0]])
    loss, _ = losses.clipped_value_loss(v, old, ret, jnp.ones((1, 3)), clip_eps=0.5)
    # clipped values: 1.5, 0.5, 1.0 -> max((2-0)^2,(1.5-0)^2)=4; max(0.25, 0)=0.25; 0
    np.testing.assert_allclose(float(loss), 0.5 * (4 + 0.25 + 0) / 3, rtol=1e-6)


def test_entropy_and_log_probs():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    np.testing.assert_allclose(float(losses.entropy_from_logits(logits)[0]),
                               -(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), rtol=1e-6)
    np.testing.assert_allclose(float(losses.token_log_probs(logits, jnp.array([1]))[0]),
                               math.log(0.25), rtol=1e-6)


def test_reward_model_losses():
    r = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    valid = jnp.array([[1, 1, 1], [1, 1, 0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pairs = [(3, 1), (3, 0), (1, 0), (0, 2)]
    expected = np.mean([-math.log(sig(a - b)) for a, b in pairs])
    np.testing.assert_allclose(float(losses.ranking_loss(r, valid)), expected, rtol=1e-6)
    np.testing.assert_allclose(losses.pairwise_loss(r[:, 0], r[:, 1]),
                               [-math.log(sig(2.0)), -math.log(sig(-2.0))], rtol=1e-6)
    labels = jnp.array([[3.0, 1.0, 1.0], [1.0, 2.0, 0.0]])
    np.testing.assert_allclose(float(losses.direct_score_loss(r, labels, valid)), (1 + 1) / 5,
                               rtol=1e-6)


def test_dpo_loss_formula():
    pc, pr = jnp.array([-10.0, -4.0]), jnp.array([-12.0, -3.0])
    rc, rr = jnp.array([-11.0, -4.0]), jnp.array([-11.0, -4.0])
    loss, margin = losses.dpo_loss(pc, pr, rc, rr, beta=0.5)
    deltas = [(-10 + 11) - (-12 + 11), (-4 + 4) - (-3 + 4)]
    np.testing.assert_allclose(margin, [0.5 * d for d in deltas], rtol=1e-6)
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-0.5 * d)) for d in deltas], rtol=1e-6)
    smoothed, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(
        smoothed, [0.9 * math.log1p(math.exp(-0.5 * d)) + 0.1 * math.log1p(math.exp(0.5 * d))
                   for d in deltas], rtol=1e-6)


def test_kl_controllers():
    fixed = kl_controller.KLController(init_coef=0.1)
    assert fixed.update(100.0, 64) == 0.1
    ada = kl_controller.KLController(init_coef=0.1, adaptive=True, target=1.0, horizon=100)
    assert ada.update(10.0, 50) == pytest.approx(0.1 * (1 + 0.2 * 0.5))   # error clipped at +0.2
    assert ada.update(0.95, 100) == pytest.approx(0.11 * (1 - 0.05))
    with pytest.raises(ValueError, match="init_coef"):
        kl_controller.KLController(init_coef=-1.0)
