"""Start a trainer.train run from given parameters (e.g. an SFT checkpoint's) instead of random ones.

trainer.train resumes from the latest checkpoint in its run_dir; writing a step-0 checkpoint of a
fresh train state whose parameters are `params` (whole, or `params` placed under `subtree`, e.g. the
reward model's "backbone") makes the run start there, sharded and restorable like any other.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import partitioning, state_init


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
    init = state_init.StateInitializer(model, optimizer, partitioner, batch_shapes, rng)
    try:
        state = init.from_params(params, subtree=subtree)
    except ValueError as e:
        checkpointer.close()
        raise ValueError(f"warm_start: {e}") from e
    with partitioner.activate():
        checkpointer.save(0, state, None, force=True)
    checkpointer.close()
