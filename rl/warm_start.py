"""Start a trainer.train run from given parameters (e.g. an SFT checkpoint's) instead of random ones.

trainer.train resumes from the latest checkpoint in its run_dir; writing a step-0 checkpoint of a
fresh train state whose parameters are `params` (whole, or `params` placed under `subtree`, e.g. the
reward model's "backbone") makes the run start there, sharded and restorable like any other.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax

from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import partitioning
from zhchat.trainer import train as train_lib
from zhchat.trainer import train_state as ts


def warm_start(run_dir: str, model: Any, params: Any, *, optimizer: Any,
               partitioner: partitioning.Partitioner, batch_shapes: Mapping[str, tuple],
               subtree: str | None = None, seed: int = 0) -> None:
    """Writes run_dir/checkpoints/0 with `params` (under `subtree` of the model's params if given)
    and fresh optimizer state; fails if run_dir already holds a checkpoint or the shapes differ."""
    checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(f"{run_dir} already holds checkpoints; warm_start needs a new run_dir")
    rng = jax.random.split(jax.random.key(seed))[0]  # the trainer's init rng for this seed
    _, state_sh, init_fn = train_lib.init_shardings(model, optimizer, partitioner, batch_shapes, rng)
    with partitioner.activate():
        fresh = jax.jit(lambda k: nn.unbox(model.init_params(k, batch_shapes)),
                        out_shardings=state_sh.params)(rng)
        target = fresh[subtree] if subtree else fresh
        shape = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)  # noqa: E731
        if shape(target) != shape(params):
            raise ValueError(f"warm_start: the given parameters do not match {type(model).__name__}"
                             f"{'[' + subtree + ']' if subtree else ''} (different sizes or vocabulary)")
        new = dict(fresh, **{subtree: params}) if subtree else params
        new = jax.device_put(new, state_sh.params)
        state = jax.jit(lambda p: ts.TrainState.create(p, optimizer), out_shardings=state_sh)(new)
        checkpointer.save(0, state, None, force=True)
    checkpointer.close()
