"""The train and eval steps compiled for a state's shardings (jit with explicit in/out shardings
and a donated state), cached so repeated runs in one process reuse the executables."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from zhchat.trainer import partitioning
from zhchat.trainer import train_state as ts

_CACHE: dict[Any, tuple[Callable, Callable]] = {}


def jitted_steps(loss_fn: Callable, microbatches: int, state_sh: Any,
                 partitioner: partitioning.Partitioner, skip_nonfinite: bool = True
                 ) -> tuple[Callable, Callable]:
    """(train step (state, batch, rng) -> (state, metrics), eval step (params, batch) -> metrics),
    cached on (loss_fn, microbatches, shardings, optimizer, rules) so repeated `train` calls in
    one process (tests, SFT/RL stages) reuse the compiled executables."""
    leaves, treedef = jax.tree.flatten(state_sh)
    key = (loss_fn, microbatches, treedef, tuple(leaves), partitioner.rules, skip_nonfinite)
    if key not in _CACHE:
        batch_sh, rep = partitioner.batch_sharding, partitioner.replicated
        constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sh)
        step = jax.jit(
            functools.partial(_train_step, loss_fn=loss_fn, microbatches=microbatches,
                              constrain=constrain, skip_nonfinite=skip_nonfinite),
            in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
            donate_argnums=(0,))
        evaluate = jax.jit(functools.partial(ts.eval_step, loss_fn=loss_fn),
                           in_shardings=(state_sh.params, batch_sh), out_shardings=rep)
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = (step, evaluate)
    return _CACHE[key]


def _train_step(state, batch, rng, *, loss_fn, microbatches, constrain, skip_nonfinite):
    return ts.train_step(state, batch, loss_fn=loss_fn, rng=rng, microbatches=microbatches,
                         constrain=constrain, skip_nonfinite=skip_nonfinite)
