"""Token losses shared by the decoder and encoder-decoder wrappers: cross-entropy from fp32 logits
with label smoothing and z-loss, and its weighted batch mean with the metrics the trainer logs.
(The RL objectives, PPO's clipped surrogate, DPO and the pairwise reward loss, are in rl/losses.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_with_logits(logits: jnp.ndarray, targets: jnp.ndarray, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-token (cross-entropy, z-loss term), both [batch, len], from fp32 logits.

    With label smoothing the target puts 1 - eps on the label and eps / (V - 1) elsewhere; the
    entropy of that target is subtracted so a perfect prediction still scores 0 (as in T5X).
    z-loss is z_loss · log(Z)^2, which keeps the softmax normaliser near 1 (PaLM).
    """
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0.0:
        conf, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        norm = -(conf * np.log(conf) + (vocab - 1) * low * np.log(low + 1e-20))
        ce = -(conf * target_lp + low * (jnp.sum(log_probs, -1) - target_lp)) - norm
    else:
        ce = -target_lp
    return ce, z_loss * jnp.square(log_z)


def weighted_token_loss(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *,
                        z_loss: float = 0.0, label_smoothing: float = 0.0
                        ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(loss, metrics) of a batch: cross-entropy + z-loss averaged over the weighted target tokens.

    Metrics `loss`, `cross_entropy`, `z_loss`, `accuracy` are token means and `num_tokens` the weight
    sum, so gradient accumulation can combine microbatches by weighting means with `num_tokens`.
    """
    weights = jnp.asarray(weights, jnp.float32)
    ce, zl = cross_entropy_with_logits(logits, targets, z_loss=z_loss,
                                       label_smoothing=label_smoothing)
    num_tokens = jnp.sum(weights)
    denom = jnp.maximum(num_tokens, 1.0)
    ce_mean = jnp.sum(ce * weights) / denom
    z_mean = jnp.sum(zl * weights) / denom
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    loss = ce_mean + z_mean
    return loss, {"loss": loss, "cross_entropy": ce_mean, "z_loss": z_mean,
                  "accuracy": jnp.sum(correct * weights) / denom, "num_tokens": num_tokens}
