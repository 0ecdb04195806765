"""Loss formulas of reward modelling, PPO and DPO, as pure functions on arrays.

Reward model (InstructGPT, Ouyang et al. 2022): pairwise -log σ(r_c - r_r); K-wise ranking averages
that over every ordered pair of a ranked list; direct score regresses r onto a label.
PPO (Schulman et al. 2017, with the value clipping of OpenAI's baselines): clipped surrogate,
clipped value loss, entropy. DPO (Rafailov et al. 2023): -log σ(β Δ) with Δ the difference of the
policy-vs-reference log-ratios of chosen and rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of x over entries where mask is 1 (0 when the mask is empty)."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def pairwise_loss(chosen: Array, rejected: Array) -> Array:
    """Per-pair -log σ(r_chosen - r_rejected): [batch]."""
    return -jax.nn.log_sigmoid(chosen - rejected)


def ranking_pairs(rewards: Array, valid: Array) -> tuple[Array, Array]:
    """Per-pair losses and mask over all (i better than j) pairs of ranked lists.

    rewards [batch, K] in rank order (index 0 best), valid [batch, K] marks present responses.
    Returns (loss [batch, K, K], mask [batch, K, K]) with mask 1 where i < j and both are valid.
    """
    k = rewards.shape[-1]
    upper = jnp.triu(jnp.ones((k, k), bool), 1)
    valid = valid.astype(bool)
    mask = upper[None] & valid[:, :, None] & valid[:, None, :]
    loss = pairwise_loss(rewards[:, :, None], rewards[:, None, :])
    return loss, mask


def ranking_loss(rewards: Array, valid: Array) -> Array:
    """K-wise loss: the mean pairwise loss over every ordered pair of every list (InstructGPT
    weights each list's C(K, 2) pairs as one batch element; here every pair counts once)."""
    loss, mask = ranking_pairs(rewards, valid)
    return masked_mean(loss, mask)


def direct_score_loss(rewards: Array, labels: Array, valid: Array) -> Array:
    """Mean squared error of rewards against score labels (e.g. 1-5 or 0-1) over valid entries."""
    return masked_mean(jnp.square(rewards - labels), valid)


def dpo_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Per-pair DPO loss and implicit reward margin β Δ, Δ = (π_c - ref_c) - (π_r - ref_r).

    Inputs are summed response log-probabilities [batch]. With `label_smoothing` ε (conservative
    DPO) the loss is -(1-ε) log σ(βΔ) - ε log σ(-βΔ).
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) \
        - label_smoothing * jax.nn.log_sigmoid(-margin)
    return loss, margin


def clipped_policy_loss(log_probs: Array, old_log_probs: Array, advantages: Array, mask: Array,
                        clip_eps: float) -> tuple[Array, dict[str, Array]]:
    """PPO surrogate: mean over response tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old.

    Metrics: clip_fraction (tokens where the clipped term was the larger), approx_kl (the
    unbiased k3 estimator mean(ρ - 1 - log ρ) of KL(π_old || π)).
    """
    log_ratio = log_probs - old_log_probs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
               "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask)}
    return loss, metrics


def clipped_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                       clip_eps: float) -> tuple[Array, dict[str, Array]]:
    """0.5 · mean max((V - R)^2, (V_old + clip(V - V_old, ±ε) - R)^2) over response tokens."""
    clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err = jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    loss = 0.5 * masked_mean(err, mask)
    frac = masked_mean((jnp.square(clipped - returns) > jnp.square(values - returns))
                       .astype(jnp.float32), mask)
    return loss, {"value_clip_fraction": frac}


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of softmax(logits) per position: [...]."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def token_log_probs(logits: Array, tokens: Array) -> Array:
    """log softmax(logits)[token] per position (fp32)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]
