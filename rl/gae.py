"""Generalised advantage estimation (Schulman et al. 2016) over padded response tokens.

δ_t = r_t + γ V_{t+1} - V_t and A_t = δ_t + γλ A_{t+1}, with V and A zero past the last real token
(the episode ends with the response). Returns are A + V (the value targets). Runs as a reversed
`lax.scan`, so it is jit- and shard-friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zhchat.rl.losses import masked_mean

Array = jax.Array


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Array, Array]:
    """(advantages, returns), both [batch, len]; rewards/values/mask [batch, len], mask 1 on real
    response tokens (a prefix of each row). Entries past a row's end are 0."""
    mask = mask.astype(jnp.float32)
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def step(carry, xs):
        delta, m = xs
        adv = delta + gamma * lam * carry * m
        return adv * m, adv * m

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0]), (deltas.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) / std over masked entries (the mean is kept when shift_mean is False)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(x.dtype)
