"""Orbax checkpoints of the train state plus the data-iterator position, restorable onto any mesh.

One checkpoint step holds two items: `state` (params, optimizer state, step; sharded arrays written by
every process) and `data` (JSON: each process's iterator state). Saves are asynchronous (orbax copies
device arrays to host, then writes in a background thread) and atomic (a temporary directory renamed
when complete); `keep` bounds how many steps stay on disk. Restoring takes abstract arrays carrying the
*target* shardings, so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def _gather_json(obj: Any) -> list[Any]:
    """All processes' JSON-serialisable `obj`, in process order (one element per process)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, lengths)]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written: the run stops rather than train on unsaved."""


def params_finite(tree: Any) -> bool:
    """True when every floating-point array of `tree` is finite (no NaN or inf).

    One compiled program for the whole tree: with several processes, per-leaf reductions are
    separate cross-process programs that may run in different orders on different hosts and
    deadlock their collectives."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")
              and jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(_all_finite(leaves))) if leaves else True


@jax.jit
def _all_finite(leaves: list[Any]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@gin.configurable
class Checkpointer:
    """Async, keep-N orbax checkpoint manager for (train state, data-iterator state)."""

    def __init__(self, directory: str, *, keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(f"checkpoint folder {self.directory} is not writable")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))
        self._pending: int | None = None  # the step of the newest save started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` and the iterator state at `step` (every `save_every` or forced)."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        if not params_finite(getattr(state, "params", state)):
            last = self.manager.latest_step()
            raise FloatingPointError(
                f"training diverged: the parameters at step {step} are not finite, so no "
                f"checkpoint was written (the last one is {self.directory}/{last}); lower the "
                "learning rate or restart from it")
        payload = {"per_process": _gather_json(data_state)}
        self.wait()  # orbax waits for the previous save anyway; a failure is named as its own
        self._pending = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(payload)), force=True)
        except Exception as e:  # noqa: BLE001  (full disk, read-only folder, lost mount)
            raise CheckpointWriteError(f"saving checkpoint step {step} to {self.directory} "
                                       f"failed: {type(e).__name__}: {e}") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, int]:
        """Restores (state, this process's iterator state, step) onto the shardings in
        `abstract_state` (a tree of `jax.ShapeDtypeStruct` with `sharding` set).

        Without `step`, the newest usable checkpoint: one that fails to restore (a missing or
        truncated array file, missing metadata, an unreadable data position, an empty step folder)
        is reported, moved aside to `<step>.corrupt` and the previous one is tried."""
        if step is not None:
            return self._restore_step(abstract_state, step)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for s in steps:
            try:
                return self._restore_step(abstract_state, s)
            except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                aside = self._move_aside(s)
                print(f"warning: checkpoint {self.directory}/{s} is damaged ({type(e).__name__}: "
                      f"{reason}); moved to {aside}", file=sys.stderr, flush=True)
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}: every step "
                                f"({', '.join(map(str, steps))}) was damaged and moved aside "
                                "to <step>.corrupt")

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, Any, int]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = restored["data"]
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"data position of step {step} is not a JSON object")
        per_process = (data or {}).get("per_process") or [None]
        if len(per_process) != jax.process_count():
            raise ValueError(
                f"checkpoint {self.directory}/{step} holds data-iterator states of "
                f"{len(per_process)} processes, this run has {jax.process_count()}")
        return restored["state"], per_process[jax.process_index()], step

    def _move_aside(self, step: int) -> str:
        """Renames the step folder to `<step>.corrupt` (process 0) and reloads the step list."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt"
        if jax.process_index() == 0 and os.path.exists(src):
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}.corrupt{n}", n + 1
            os.rename(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()
        return dst

    def check(self) -> None:
        """Raises if an asynchronous save has failed (non-blocking; the trainer calls it every
        step, so a full disk or a lost mount stops the run at the next step)."""
        self._raising_write_errors(self.manager.check_for_errors)
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()  # the save has ended: joining it is immediate and raises its failure
            # (orbax's finalize thread keeps a commit failure until it is joined)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed (raising if one failed)."""
        self._raising_write_errors(self.manager.wait_until_finished, self.manager.check_for_errors)

    def _raising_write_errors(self, *calls) -> None:
        try:
            for call in calls:
                call()
        except Exception as e:  # noqa: BLE001
            raise CheckpointWriteError(
                f"the asynchronous save of checkpoint step {self._pending} to {self.directory} "
                f"failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.wait()
        self.manager.close()


def restore_params_only(directory: str, abstract_params: Any, step: int | None = None, *,
                        under: tuple[str, ...] = ()) -> tuple[Any, int]:
    """Only the parameters of a train-state checkpoint (no optimizer state, no data position),
    onto the shardings carried by `abstract_params`: for fine-tuning from a pretrained run, for
    inference and for frozen reference/reward models. `under` names the train state inside a
    larger saved tree (a PPO run saves {"policy", "critic"}: under=("policy",)).
    Returns (params, step)."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    target = {"params": abstract_params}
    for key in reversed(under):
        target = {key: target}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {directory}/{step} does not match this model's parameters "
                         f"(another architecture or vocabulary size?): {str(e)[:500]}") from e
    finally:
        manager.close()
    params = restored["state"]
    for key in under:
        params = params[key]
    params = params["params"]
    missing = [jax.tree_util.keystr(path) for path, x in
               jax.tree_util.tree_flatten_with_path(params)[0] if not isinstance(x, jax.Array)]
    if missing:  # partial restore leaves parameters the checkpoint lacks as abstract values
        raise ValueError(f"checkpoint {directory}/{step} lacks {len(missing)} parameter(s) of this "
                         f"model (another architecture?), e.g. {missing[:3]}")
    return params, step


def restore_params(directory: str, model: Any, partitioner: Any, rng: jax.Array,
                   step: int | None = None) -> tuple[Any, int]:
    """`restore_params_only` for a model wrapper: parameter shapes come from `model.init_params`
    (traced, never allocated) and shardings from the partitioner's rules."""
    import flax.linen as nn

    shapes = {k: (1, 8) for k in ("decoder_input_tokens", "decoder_target_tokens",
                                  "decoder_segment_ids", "decoder_positions",
                                  "decoder_loss_weights", "encoder_input_tokens",
                                  "encoder_segment_ids", "encoder_positions")}
    with partitioner.activate():
        boxed = jax.eval_shape(lambda k: model.init_params(k, shapes), rng)
    abstract = abstract_with_shardings(nn.unbox(boxed), partitioner.shardings(boxed))
    return restore_params_only(directory, abstract, step)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
