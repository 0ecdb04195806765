"""Train state (params + optimizer state + step) and the jitted train / eval steps.

The step function is pure: dropout RNG is `fold_in(rng, step)`, so a resumed run draws the same
numbers. Gradient accumulation splits the batch into `microbatches` interleaved slices (each keeps the
batch sharding), scans over them and sums fp32 gradients weighted by each slice's token count, which
equals the gradient of the whole batch's token-mean loss.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jnp.ndarray]
WEIGHTS_KEY = "decoder_loss_weights"


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; `tx` is static (rebuilt from gin on restore)."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

    def apply_gradients(self, grads: Any) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def combine_metrics(parts: Metrics, counts: jnp.ndarray) -> Metrics:
    """Combines per-microbatch metrics [k]: `num_*` are summed, the rest token-weighted averaged."""
    total = jnp.maximum(counts.sum(), 1.0)
    return {k: (v.sum() if k.startswith("num_") else (v * counts).sum() / total)
            for k, v in parts.items()}


def _num_tokens(batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    if WEIGHTS_KEY in batch:
        return batch[WEIGHTS_KEY].astype(jnp.float32).sum()
    first = next(iter(batch.values()))
    return jnp.asarray(first.size, jnp.float32)


def split_microbatches(batch: Any, k: int) -> Any:
    """[B, ...] -> [k, B/k, ...] for every array of `batch` (a dict or any pytree); slice j holds
    examples j, j+k, ... so every device keeps work."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by microbatches={k}")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, dict(batch) if isinstance(batch, Mapping) else batch)


def grads_and_metrics(loss_fn: Callable, params: Any, batch: Mapping[str, jnp.ndarray],
                      rng: jax.Array, microbatches: int = 1,
                      constrain: Callable[[Any], Any] = lambda x: x) -> tuple[Any, Metrics]:
    """fp32 gradients of the batch's token-mean loss (accumulated over microbatches) and metrics."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    to_f32 = lambda t: jax.tree.map(lambda g: g.astype(jnp.float32), t)  # noqa: E731
    if microbatches <= 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return to_f32(grads), dict(metrics)

    micro = split_microbatches(batch, microbatches)
    counts = jax.vmap(_num_tokens)(micro)
    total = jnp.maximum(counts.sum(), 1.0)

    def body(acc, xs):
        mb, count, i = xs
        mb_rng = None if rng is None else jax.random.fold_in(rng, i)
        (_, metrics), grads = grad_fn(params, constrain(mb), mb_rng)
        w = count / total
        acc = jax.tree.map(lambda a, g: a + jnp.where(count > 0, g.astype(jnp.float32) * w, 0.0),
                           acc, grads)
        return acc, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, parts = jax.lax.scan(body, zeros, (micro, counts, jnp.arange(microbatches)))
    return grads, combine_metrics(parts, counts)


def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *, loss_fn: Callable,
               rng: jax.Array, microbatches: int = 1,
               constrain: Callable[[Any], Any] = lambda x: x, skip_nonfinite: bool = True
               ) -> tuple[TrainState, Metrics]:
    """One optimizer step; metrics gain `grad_norm` (pre-clipping) and `param_norm`.

    With `skip_nonfinite`, a step whose loss or gradient norm is NaN/inf leaves the params and
    optimizer state as they were (the step counter and the data still advance past the batch) and
    reports `skipped` = 1, so one bad batch cannot poison the run."""
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = grads_and_metrics(loss_fn, state.params, batch, step_rng, microbatches,
                                       constrain)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads)
    if skip_nonfinite:
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (new_state.params, new_state.opt_state),
                                         (state.params, state.opt_state))
        new_state = new_state.replace(params=params, opt_state=opt_state)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    metrics["param_norm"] = optax.tree.norm(new_state.params)
    return new_state, metrics


def eval_step(params: Any, batch: Mapping[str, jnp.ndarray], *, loss_fn: Callable) -> Metrics:
    """Loss/accuracy metrics of one batch without dropout."""
    _, metrics = loss_fn(params, batch, None)
    return dict(metrics)
