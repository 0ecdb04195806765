"""The gin-configured train loop (`python -m zhchat.trainer.train`; the CLI is trainer/cli.py).

`train(...)` builds the mesh and the train state (fresh and directly sharded, restored from the
newest checkpoint in `run_dir`, or from another run's parameters: trainer/state_init.py), then
runs jitted, donated steps (trainer/step_fns.py) over batches placed on devices one step ahead
(trainer/feed.py). Metrics are fetched every `log_every` steps only. Pretraining, SFT, reward
models and DPO all run through it; it returns a small summary for tests and pipeline stages.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np

from zhchat.models import flops as flops_lib
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import faults, feed, optimizers, partitioning, state_init, step_fns
from zhchat.trainer import metrics as metrics_lib

if __name__ == "__main__":  # `python -m`: run the importable modules so gin registers `train` once
    from zhchat.trainer.cli import console_main
    console_main()


DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                    "decoder_positions", "decoder_loss_weights")


@gin.configurable
def train(*, model: Any = gin.REQUIRED, train_data: Any = None, eval_data: Any = None,
          partitioner: partitioning.Partitioner | None = None, optimizer: Any = None,
          schedule: Callable | None = None, num_steps: int = 1000, batch_size: int = 8,
          microbatches: int = 1, seq_len: int | None = None, eval_every: int = 0,
          eval_steps: int = 10, log_every: int = 10, checkpoint_every: int = 1000,
          keep_checkpoints: int | None = 3, async_checkpointing: bool = True,
          run_dir: str | None = None, init_checkpoint_dir: str | None = None,
          eval_hooks: Sequence[Callable[[int, Any], Mapping[str, float]]] = (), seed: int = 0,
          peak_flops_per_device: float = flops_lib.H100_BF16_PEAK_FLOPS,
          progress_bar: bool = True, dry_run: bool = False, skip_nonfinite: bool = True,
          max_skipped_steps: int | None = 50, spike_factor: float | None = None,
          max_rollbacks: int = 3) -> dict[str, Any]:
    """Trains `model` for `num_steps` (global batch `batch_size` split into `microbatches`).

    Resumes from the latest checkpoint under `run_dir/checkpoints` when there is one (same step,
    data position and RNG). Otherwise, with `init_checkpoint_dir` (another run's checkpoints, e.g.
    pretraining before SFT), starts from that run's parameters with a fresh optimizer and step 0.
    The parsed gin config is written to `run_dir/config.gin` (what infer/chat rebuild models from).
    `skip_nonfinite`: a step with a NaN/inf loss or gradient changes nothing (counted, reported);
    after `max_skipped_steps` such steps the run stops with FloatingPointError (diverged). A
    checkpoint is never written from non-finite parameters; SIGTERM stops after the current step
    with a final checkpoint. `spike_factor` (PaLM's remedy): a logged loss above that multiple of
    the running median restores the newest checkpoint's params and optimizer state, keeps the step
    count and the data position (the batches since that checkpoint are skipped); after
    `max_rollbacks` of them the run stops with FloatingPointError.
    Returns {"step", "loss" (last logged), "history" (one dict per log),
    "eval_history", "num_params", "state" (the final TrainState)};
    with `dry_run` only prints the model/mesh report and returns {"num_params", "report"}.
    `eval_hooks` are called as hook(step, params) -> {name: value} every `eval_every` steps, beside
    the loss eval (for metrics that need generation, e.g. tasks/seqio_eval.make_eval_hook).
    """
    partitioner = partitioner or partitioning.Partitioner()
    tx = optimizer or optimizers.make_optimizer()
    local_batch = _local_batch(batch_size, microbatches, partitioner)
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    data_it = first = None
    if seq_len is None and not dry_run:  # the features and their shapes come from the data
        data_it = feed.make_iterator(train_data, batch_size=local_batch, seed=seed)
        first, data_it = feed.peek(data_it)
    shapes, seq_len, tokens_per_example = _feature_shapes(first, batch_size // microbatches,
                                                          seq_len)
    init = state_init.StateInitializer(model, tx, partitioner, shapes, init_rng)
    if dry_run:
        report = describe(model, partitioner, init.boxed, seq_len)
        print(report, flush=True)
        return {"num_params": init.num_params, "report": report}
    if data_it is None:
        data_it = feed.make_iterator(train_data, batch_size=local_batch, seed=seed)

    _write_config(run_dir)
    checkpointer = None
    if run_dir and (checkpoint_every or keep_checkpoints):
        checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                             keep=keep_checkpoints, save_every=checkpoint_every,
                                             async_save=async_checkpointing)
    state = _start_state(init, checkpointer, data_it, init_checkpoint_dir)
    start = int(jax.device_get(state.step))
    step_fn, eval_fn = step_fns.jitted_steps(model.loss_fn, microbatches, init.shardings,
                                             partitioner, skip_nonfinite)
    batches = feed.DevicePrefetcher(data_it, partitioner.batch_sharding, global_batch=batch_size)
    evaluate = feed.EvalRunner(eval_data, eval_fn, partitioner, batch_size=batch_size,
                               local_batch=local_batch, seed=seed, steps=eval_steps)
    writer = metrics_lib.MetricsWriter(run_dir, total_steps=num_steps, initial_step=start,
                                       progress_bar=progress_bar)
    log = metrics_lib.LogWindow(tokens_per_step=batch_size * tokens_per_example,
                                flops_per_token=model.flops_per_token(seq_len),
                                peak_flops_per_device=peak_flops_per_device, schedule=schedule)
    skips, spikes = faults.SkipCounter(max_skipped_steps), faults.SpikeGuard(spike_factor,
                                                                              max_rollbacks)
    history, eval_history, data_state, ran = [], [], None, False
    with partitioner.activate(), faults.guarded_run(writer, checkpointer) as preempted:
        for step in range(start, num_steps):
            if preempted.requested:
                print(f"SIGTERM: stopping at step {step} with a final checkpoint",
                      file=sys.stderr, flush=True)
                break
            t_read = time.perf_counter()
            fetched = _next_batch(batches, step, num_steps)
            if fetched is None:
                break
            batch, data_state = fetched
            t_step = time.perf_counter()
            state, step_metrics = step_fn(state, batch, step_rng)
            t_dispatched = time.perf_counter()
            batches.prefetch()  # overlaps the host's next read with this step on the device
            log.add(step_metrics, state, host_s=(t_step - t_read)
                    + (time.perf_counter() - t_dispatched))
            ran, done = True, step + 1

            if done % log_every == 0 or done == num_steps:
                scalars, steps = log.flush(done)
                skips.add(round(scalars.get("skipped", 0.0) * steps), done,
                          checkpointer.latest_step() if checkpointer is not None else None)
                if spikes.is_spike(scalars.get("loss")) and checkpointer is not None:
                    state = spikes.roll_back(state, checkpointer, done, scalars["loss"],
                                             init.abstract)
                writer.write(done, scalars)
                history.append({"step": done, **scalars})
            with log.paused():
                if eval_every and done % eval_every == 0 and (evaluate.enabled or eval_hooks):
                    results = evaluate(state.params) if evaluate.enabled else {}
                    for hook in eval_hooks:  # e.g. seqio metrics (generate -> metric_fns)
                        results.update(hook(done, state.params))
                    writer.write(done, results, prefix="eval")
                    eval_history.append({"step": done, **results})
                if checkpointer is not None:
                    checkpointer.check()  # a background save that failed stops the run now
                    checkpointer.save(done, state, data_state)
            writer.advance()

        if checkpointer is not None:
            if ran:
                checkpointer.save(int(jax.device_get(state.step)), state, data_state, force=True)
            checkpointer.close()
        writer.close()
    return {"step": int(jax.device_get(state.step)),
            "loss": history[-1]["loss"] if history else float("nan"), "history": history,
            "eval_history": eval_history, "num_params": init.num_params, "state": state,
            "skipped_steps": skips.total}


def _local_batch(batch_size: int, microbatches: int, partitioner: partitioning.Partitioner
                 ) -> int:
    """This process's share of the global batch, after checking that it splits evenly."""
    dp = partitioner.data_parallel_size
    if batch_size % microbatches or (batch_size // microbatches) % dp:
        raise ValueError(f"train.batch_size={batch_size} must split into microbatches="
                         f"{microbatches} each divisible by the data-parallel size {dp}")
    if batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={batch_size} not divisible by "
                         f"{jax.process_count()} processes")
    return batch_size // jax.process_count()


def _feature_shapes(first: Mapping[str, Any] | None, micro: int, seq_len: int | None
                    ) -> tuple[dict[str, tuple], int, int]:
    """(per-microbatch feature shapes, sequence length, tokens per example) from the first batch
    (its real features, encoder ones too), else decoder features of `seq_len` (default 2048)."""
    if first is None:
        seq_len = seq_len or 2048
        return {k: (micro, seq_len) for k in DECODER_FEATURES}, seq_len, seq_len
    # [batch, len], or [batch, K, len] for K responses per example (reward models, DPO)
    example_shape = np.asarray(first["decoder_input_tokens"]).shape[1:]
    shapes = {k: (micro,) + np.asarray(v).shape[1:] for k, v in first.items()}
    return shapes, int(example_shape[-1]), math.prod(example_shape)


def _write_config(run_dir: str | None) -> None:
    """The parsed gin config, for infer/chat/serve to rebuild the model from."""
    if run_dir and jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.config_str())


def _start_state(init: state_init.StateInitializer, checkpointer: ckpt_lib.Checkpointer | None,
                 data_it: Any, init_checkpoint_dir: str | None) -> Any:
    """Resumes from the run's newest checkpoint (and its data position), else starts from
    `init_checkpoint_dir`'s parameters with a fresh optimizer, else from a fresh init."""
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, data_state, restored = init.restore(checkpointer)
        print(f"restored step {restored} from {checkpointer.directory}/{restored}",
              file=sys.stderr, flush=True)
        if data_state is not None and hasattr(data_it, "set_state"):
            data_it.set_state(data_state)
        else:
            print("warning: the data position was not restored (no saved iterator state or "
                  "an iterator without set_state); data restarts from its beginning",
                  file=sys.stderr, flush=True)
        return state
    if init_checkpoint_dir:
        params, from_step = init.params_from_checkpoint(init_checkpoint_dir)
        print(f"initialised parameters from {init_checkpoint_dir} (step {from_step}); "
              "fresh optimizer state", file=sys.stderr, flush=True)
        return init.from_params(params)
    return init.init()


def _next_batch(batches: feed.DevicePrefetcher, step: int, num_steps: int
                ) -> tuple[dict[str, jax.Array], Any] | None:
    """(device batch, data position after it), or None when the data ran out (reported)."""
    try:
        return next(batches)
    except StopIteration:
        print(f"train data ran out after step {step} (of num_steps={num_steps}); stopping",
              file=sys.stderr, flush=True)
        return None


def describe(model: Any, partitioner: partitioning.Partitioner, boxed: Any, seq_len: int) -> str:
    """The dry-run report: parameter count, mesh, per-parameter shardings and FLOPs per token."""
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(boxed)))
    lines = [f"parameters: {count:,} ({count / 1e9:.2f}B)",
             f"mesh: {dict(partitioner.mesh.shape)} over {partitioner.mesh.devices.size} "
             f"{jax.devices()[0].platform} device(s)",
             f"flops per token (seq_len={seq_len}, fwd+bwd): {model.flops_per_token(seq_len):.4e}",
             "shardings (path, shape, logical axes -> mesh axes):"]
    return "\n".join(lines + ["  " + ln for ln in partitioner.summary(boxed)])
