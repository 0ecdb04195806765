"""Optimizers (AdamW, Adafactor), learning-rate schedules and global-norm clipping, gin-configured.

Weight decay applies only to matrices (ndim >= 2): norms' scales and biases are not decayed, as in
LLaMA and T5X. Gradient clipping happens before the optimizer update, on the global norm.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


@gin.configurable
def make_schedule(*, kind: str = "cosine", peak_value: float = 3e-4, warmup_steps: int = 1000,
                  decay_steps: int = 100_000, end_value_ratio: float = 0.1) -> Schedule:
    """Linear warmup to `peak_value`, then `kind`: "cosine" (to peak*end_value_ratio at
    `decay_steps`), "rsqrt" (peak * sqrt(warmup / step), T5's inverse square root) or "constant"."""
    warmup_steps = int(warmup_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak_value, warmup_steps=warmup_steps,
            decay_steps=max(int(decay_steps), warmup_steps + 1),
            end_value=peak_value * end_value_ratio)
    if kind == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            warm = peak_value * step / max(warmup_steps, 1)
            decay = peak_value * jnp.sqrt(max(warmup_steps, 1) / jnp.maximum(step, 1.0))
            return jnp.where(step < warmup_steps, warm, decay)
        return rsqrt
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_value, max(warmup_steps, 1)),
             optax.constant_schedule(peak_value)], [warmup_steps])
    raise ValueError(f"make_schedule.kind={kind!r}: expected 'cosine', 'rsqrt' or 'constant'")


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (matrices, not norm scales or biases)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


@gin.configurable
def make_optimizer(*, name: str = "adamw", learning_rate: Schedule | float | None = None,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_norm: float | None = 1.0,
                   adafactor_decay_rate: float = 0.8,
                   adafactor_momentum: float | None = None,
                   mu_dtype: str | None = None) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW or Adafactor with `learning_rate` (default schedule).

    `mu_dtype` (AdamW, e.g. "bfloat16") stores the first moment in that dtype: a quarter less
    optimizer memory and traffic; the second moment stays fp32 (its small values need the range)."""
    lr = make_schedule() if learning_rate is None else learning_rate
    if mu_dtype is not None and name != "adamw":
        raise ValueError(f"make_optimizer.mu_dtype applies to adamw only, not {name!r}")
    if name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                          mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype))
    elif name == "adafactor":
        opt = optax.adafactor(lr, decay_rate=adafactor_decay_rate, momentum=adafactor_momentum,
                              multiply_by_parameter_scale=False, clipping_threshold=None,
                              weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)
    else:
        raise ValueError(f"make_optimizer.name={name!r}: expected 'adamw' or 'adafactor'")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, opt)

