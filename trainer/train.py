"""The gin-configured train loop and its CLI (`python -m zhchat.trainer.train`).

`train(...)` builds the mesh, initialises the train state directly sharded (jit with out_shardings),
or restores the latest checkpoint in `run_dir` onto the current mesh, then runs jitted, donated steps
over batches placed on devices one step ahead. Metrics are fetched every `log_every` steps only.
Pretraining, SFT and RL stages call it from Python too; it returns a small summary for tests.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np

from zhchat.gin_configs import cli as gin_cli
from zhchat.models import flops as flops_lib
from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import faults
from zhchat.trainer import metrics as metrics_lib
from zhchat.trainer import optimizers
from zhchat.trainer import partitioning
from zhchat.trainer import train_state as ts

if __name__ == "__main__":  # `python -m`: run the importable module so gin registers `train` once
    from zhchat.trainer.train import console_main
    console_main()


DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                    "decoder_positions", "decoder_loss_weights")


def make_iterator(source: Any, *, batch_size: int, seed: int) -> Iterator:
    """An iterator of this process's batches: `source` is an iterator, an iterable, or a factory
    called with (batch_size, seed, shard_index, shard_count) for this process's input shard."""
    if source is None:
        raise ValueError("train.train_data is not set (bind e.g. @train/make_cache_iterator)")
    if hasattr(source, "__next__"):
        return source
    if callable(source):
        return source(batch_size=batch_size, seed=seed, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
    return iter(source)


class DevicePrefetcher:
    """Yields (global device batch, iterator state after it). Call `prefetch()` right after
    dispatching a step: the next batch is then read and placed while the device computes."""

    def __init__(self, it: Iterator, sharding: jax.sharding.Sharding, *, global_batch: int):
        self.it, self.sharding, self.global_batch = it, sharding, global_batch
        self._next: tuple[dict[str, jax.Array], Any] | None = None
        self._exhausted = False

    def _fetch(self) -> tuple[dict[str, jax.Array], Any] | None:
        try:
            local = next(self.it)
        except StopIteration:
            self._exhausted = True
            return None
        batch = {}
        for name, x in local.items():
            x = np.asarray(x)
            global_shape = (self.global_batch,) + x.shape[1:]
            batch[name] = jax.make_array_from_process_local_data(self.sharding, x, global_shape)
        return batch, (self.it.get_state() if hasattr(self.it, "get_state") else None)

    def prefetch(self) -> None:
        if self._next is None and not self._exhausted:
            self._next = self._fetch()

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[dict[str, jax.Array], Any]:
        self.prefetch()
        if self._next is None:
            raise StopIteration
        current, self._next = self._next, None
        return current


def init_shardings(model: Any, tx: Any, partitioner: partitioning.Partitioner,
                   batch_shapes: Mapping[str, tuple], rng: jax.Array) -> tuple[Any, Any, Callable]:
    """(abstract boxed params, TrainState of shardings, init fn) without allocating anything."""
    def init_fn(key):
        return ts.TrainState.create(nn.unbox(model.init_params(key, batch_shapes)), tx)

    with partitioner.activate():
        boxed = jax.eval_shape(lambda k: model.init_params(k, batch_shapes), rng)
        abstract_state = jax.eval_shape(init_fn, rng)
    params_sh = partitioner.shardings(boxed)
    opt_sh = partitioner.derived_shardings(abstract_state.opt_state, nn.unbox(boxed), params_sh)
    state_sh = ts.TrainState(step=partitioner.replicated, params=params_sh, opt_state=opt_sh, tx=tx)
    return boxed, state_sh, init_fn


_JIT_CACHE: dict[Any, Any] = {}


def jitted_steps(loss_fn: Callable, microbatches: int, state_sh: Any,
                 partitioner: partitioning.Partitioner, skip_nonfinite: bool = True
                 ) -> tuple[Callable, Callable]:
    """(train step, eval step) jitted with explicit shardings and a donated state. Cached on
    (loss_fn, microbatches, shardings, optimizer) so repeated `train` calls in one process (tests,
    SFT/RL stages) reuse the compiled executables."""
    leaves, treedef = jax.tree.flatten(state_sh)
    key = (loss_fn, microbatches, treedef, tuple(leaves), partitioner.rules, skip_nonfinite)
    if key not in _JIT_CACHE:
        batch_sh, rep = partitioner.batch_sharding, partitioner.replicated
        constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=batch_sh)
        step = jax.jit(
            functools.partial(_train_step, loss_fn=loss_fn, microbatches=microbatches,
                              constrain=constrain, skip_nonfinite=skip_nonfinite),
            in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
            donate_argnums=(0,))
        evaluate = jax.jit(functools.partial(ts.eval_step, loss_fn=loss_fn),
                           in_shardings=(state_sh.params, batch_sh), out_shardings=rep)
        if len(_JIT_CACHE) > 8:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = (step, evaluate)
    return _JIT_CACHE[key]


def jitted_init(init_fn: Callable, state_sh: Any, key: Any) -> Callable:
    """`init_fn` jitted to produce the state directly sharded (never whole on one device); cached
    on (`key`, shardings) like `jitted_steps`."""
    leaves, treedef = jax.tree.flatten(state_sh)
    full_key = ("init", key, treedef, tuple(leaves))
    if full_key not in _JIT_CACHE:
        _JIT_CACHE[full_key] = jax.jit(init_fn, out_shardings=state_sh)
    return _JIT_CACHE[full_key]


def _train_step(state, batch, rng, *, loss_fn, microbatches, constrain, skip_nonfinite):
    return ts.train_step(state, batch, loss_fn=loss_fn, rng=rng, microbatches=microbatches,
                         constrain=constrain, skip_nonfinite=skip_nonfinite)


def describe(model: Any, partitioner: partitioning.Partitioner, boxed: Any, seq_len: int) -> str:
    """The dry-run report: parameter count, mesh, per-parameter shardings and FLOPs per token."""
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(boxed)))
    lines = [f"parameters: {count:,} ({count / 1e9:.2f}B)",
             f"mesh: {dict(partitioner.mesh.shape)} over {partitioner.mesh.devices.size} "
             f"{jax.devices()[0].platform} device(s)",
             f"flops per token (seq_len={seq_len}, fwd+bwd): {model.flops_per_token(seq_len):.4e}",
             "shardings (path, shape, logical axes -> mesh axes):"]
    return "\n".join(lines + ["  " + ln for ln in partitioner.summary(boxed)])


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
    dp = partitioner.data_parallel_size
    if batch_size % microbatches or (batch_size // microbatches) % dp:
        raise ValueError(f"train.batch_size={batch_size} must split into microbatches="
                         f"{microbatches} each divisible by the data-parallel size {dp}")
    if batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={batch_size} not divisible by "
                         f"{jax.process_count()} processes")
    local_batch = batch_size // jax.process_count()
    init_rng, step_rng = jax.random.split(jax.random.key(seed))

    data_it = first = None
    if seq_len is None and not dry_run:
        data_it = make_iterator(train_data, batch_size=local_batch, seed=seed)
        if hasattr(data_it, "get_state"):
            start_data_state = data_it.get_state()
            first = next(data_it)
            data_it.set_state(start_data_state)
        else:
            first = next(data_it)
        # [batch, len], or [batch, K, len] for K responses per example (reward models, DPO)
        example_shape = np.asarray(first["decoder_input_tokens"]).shape[1:]
        seq_len = int(example_shape[-1])
    seq_len = seq_len or 2048
    tokens_per_example = math.prod(example_shape) if first is not None else seq_len
    micro = batch_size // microbatches
    if first is not None:  # the real features (encoder ones too, for encoder-decoder models)
        shapes = {k: (micro,) + np.asarray(v).shape[1:] for k, v in first.items()}
    else:
        shapes = {k: (micro, seq_len) for k in DECODER_FEATURES}
    boxed, state_sh, init_fn = init_shardings(model, tx, partitioner, shapes, init_rng)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(boxed)))
    if dry_run:
        report = describe(model, partitioner, boxed, seq_len)
        print(report, flush=True)
        return {"num_params": num_params, "report": report}

    if data_it is None:
        data_it = make_iterator(train_data, batch_size=local_batch, seed=seed)
    if first is not None and not hasattr(data_it, "get_state"):
        data_it = _chain_first(first, data_it)

    if run_dir and jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.config_str())
    checkpointer = None
    if run_dir and (checkpoint_every or keep_checkpoints):
        checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                             keep=keep_checkpoints, save_every=checkpoint_every,
                                             async_save=async_checkpointing)
    with partitioner.activate():
        if checkpointer is not None and checkpointer.latest_step() is not None:
            abstract = jax.eval_shape(init_fn, init_rng)
            state, data_state, restored = checkpointer.restore(
                ckpt_lib.abstract_with_shardings(abstract, state_sh))
            print(f"restored step {restored} from {checkpointer.directory}/{restored}",
                  file=sys.stderr, flush=True)
            if data_state is not None and hasattr(data_it, "set_state"):
                data_it.set_state(data_state)
            else:
                print("warning: the data position was not restored (no saved iterator state or "
                      "an iterator without set_state); data restarts from its beginning",
                      file=sys.stderr, flush=True)
        else:
            state = jitted_init(init_fn, state_sh, (model, tuple(sorted(shapes.items()))))(init_rng)
            if init_checkpoint_dir:
                params, from_step = ckpt_lib.restore_params_only(
                    init_checkpoint_dir, ckpt_lib.abstract_with_shardings(
                        jax.eval_shape(init_fn, init_rng).params, state_sh.params))
                state = state.replace(params=params)
                print(f"initialised parameters from {init_checkpoint_dir} (step {from_step}); "
                      "fresh optimizer state", file=sys.stderr, flush=True)
        start = int(jax.device_get(state.step))

        step_fn, eval_fn = jitted_steps(model.loss_fn, microbatches, state_sh, partitioner,
                                        skip_nonfinite)

        writer = metrics_lib.MetricsWriter(run_dir, total_steps=num_steps, initial_step=start,
                                           progress_bar=progress_bar)
        flops_per_token = model.flops_per_token(seq_len)
        batches = DevicePrefetcher(data_it, partitioner.batch_sharding, global_batch=batch_size)
        eval_runner = _EvalRunner(eval_data, eval_fn, partitioner, batch_size=batch_size,
                                  local_batch=local_batch, seed=seed, steps=eval_steps)
        history, eval_history, window = [], [], []
        data_state, t_start, timed_steps, ran, fetch_s = None, None, 0, False, 0.0
        preempted, skipped_total = faults.Preemption(), 0
        spikes = faults.SpikeGuard(spike_factor, max_rollbacks)
        try:
            for step in range(start, num_steps):
                if preempted.requested:
                    print(f"SIGTERM: stopping at step {step} with a final checkpoint",
                          file=sys.stderr, flush=True)
                    break
                fetch_start = time.perf_counter()
                try:
                    batch, next_data_state = next(batches)
                except StopIteration:
                    print(f"train data ran out after step {step} (of num_steps={num_steps}); "
                          "stopping", file=sys.stderr, flush=True)
                    break
                data_state, ran = next_data_state, True
                fetched = time.perf_counter()
                state, step_metrics = step_fn(state, batch, step_rng)
                dispatched = time.perf_counter()
                batches.prefetch()  # overlaps the host's next read with this step on the device
                fetch_s += (fetched - fetch_start) + (time.perf_counter() - dispatched)
                window.append(step_metrics)
                done = step + 1
                if t_start is None:  # the first step compiles: time throughput from its end
                    jax.block_until_ready(state.step)
                    t_start, timed_steps = time.perf_counter(), 0
                else:
                    timed_steps += 1
                if done % log_every == 0 or done == num_steps:
                    scalars = metrics_lib.mean_metrics(window)
                    skipped = round(scalars.get("skipped", 0.0) * len(window))
                    if skipped:
                        skipped_total += skipped
                        print(f"warning: {skipped} step(s) up to step {done} had a non-finite loss "
                              f"or gradient and were skipped ({skipped_total} in all)",
                              file=sys.stderr, flush=True)
                        if max_skipped_steps is not None and skipped_total >= max_skipped_steps:
                            last = checkpointer.latest_step() if checkpointer is not None else None
                            raise FloatingPointError(
                                f"training diverged: {skipped_total} steps up to step {done} had a "
                                f"non-finite loss or gradient (max_skipped_steps="
                                f"{max_skipped_steps}); the last checkpoint is step {last}: "
                                "lower the learning rate or restart from it")
                    if timed_steps:
                        seconds = time.perf_counter() - t_start
                        scalars.update(metrics_lib.throughput(
                            tokens=timed_steps * batch_size * tokens_per_example, seconds=seconds,
                            flops_per_token=flops_per_token, num_devices=jax.device_count(),
                            peak_flops_per_device=peak_flops_per_device))
                        scalars["step_time_s"] = seconds / timed_steps
                    # host seconds a step spent reading + placing its batch (hidden while below
                    # the device's step time, since the read overlaps the dispatched step)
                    scalars["host_data_s_per_step"] = fetch_s / len(window)
                    if schedule is not None:
                        scalars["learning_rate"] = float(schedule(done))
                    if spikes.is_spike(scalars.get("loss")) and checkpointer is not None:
                        state = spikes.roll_back(state, checkpointer, done, scalars["loss"],
                                                 ckpt_lib.abstract_with_shardings(
                                                     jax.eval_shape(init_fn, init_rng), state_sh))
                    writer.write(done, scalars)
                    history.append({"step": done, **scalars})
                    window, t_start, timed_steps, fetch_s = [], time.perf_counter(), 0, 0.0
                paused = time.perf_counter()  # eval and checkpoint time is not training throughput
                if eval_every and done % eval_every == 0 and (eval_runner.enabled or eval_hooks):
                    results = eval_runner(state.params) if eval_runner.enabled else {}
                    for hook in eval_hooks:  # e.g. seqio metric evaluation (generate -> metric_fns)
                        results.update(hook(done, state.params))
                    writer.write(done, results, prefix="eval")
                    eval_history.append({"step": done, **results})
                if checkpointer is not None:
                    checkpointer.check()  # a background save that failed stops the run now
                    checkpointer.save(done, state, data_state)
                if t_start is not None:
                    t_start += time.perf_counter() - paused
                writer.advance()
            if checkpointer is not None:
                if ran:
                    checkpointer.save(int(jax.device_get(state.step)), state, data_state,
                                      force=True)
                checkpointer.close()
            writer.close()
        except BaseException:
            faults.close_quietly(writer, checkpointer)  # a failed write or Ctrl-C: no hang at exit
            raise
        finally:
            preempted.restore()
    final_loss = history[-1]["loss"] if history else float("nan")
    return {"step": int(jax.device_get(state.step)), "loss": final_loss, "history": history,
            "eval_history": eval_history, "num_params": num_params, "state": state,
            "skipped_steps": skipped_total}


def _chain_first(first: Mapping[str, np.ndarray], rest: Iterator) -> Iterator:
    yield first
    yield from rest


class _EvalRunner:
    """Evaluates `steps` batches of the eval stream, rewound to its start each time if possible."""

    def __init__(self, source: Any, eval_fn: Callable, partitioner: partitioning.Partitioner, *,
                 batch_size: int, local_batch: int, seed: int, steps: int):
        self.enabled = source is not None
        if not self.enabled:
            return
        self.it = make_iterator(source, batch_size=local_batch, seed=seed)
        self.start = self.it.get_state() if hasattr(self.it, "get_state") else None
        self.eval_fn, self.partitioner, self.batch_size, self.steps = (
            eval_fn, partitioner, batch_size, steps)

    def __call__(self, params: Any) -> dict[str, float]:
        if self.start is not None:
            self.it.set_state(self.start)
        fetched = DevicePrefetcher(self.it, self.partitioner.batch_sharding,
                                   global_batch=self.batch_size)
        parts = []
        for _ in range(self.steps):
            batch, _ = next(fetched)
            parts.append(self.eval_fn(params, batch))
        host = jax.device_get(parts)
        counts = np.array([float(m.get("num_tokens", 1.0)) for m in host])
        total = max(counts.sum(), 1.0)
        return {k: float(sum(np.asarray(m[k], np.float64) for m in host)) if k.startswith("num_")
                else float(sum(float(m[k]) * c for m, c in zip(host, counts)) / total)
                for k in host[0]}


def _distributed_init(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, when a coordinator is given (multi-host launch)."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return
    num = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=None if num is None else int(num),
                               process_id=None if pid is None else int(pid))


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse gin, optionally join a multi-host job, run `train` (or the dry run)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        files, bindings, rest = gin_cli.split_gin_args(argv)
        parser = argparse.ArgumentParser(prog="python -m zhchat.trainer.train")
        parser.add_argument("--dry_run", action="store_true",
                            help="print params/mesh/shardings/FLOPs via eval_shape and exit")
        parser.add_argument("--coordinator_address", default=None)
        parser.add_argument("--num_processes", type=int, default=None)
        parser.add_argument("--process_id", type=int, default=None)
        args = parser.parse_args(rest)
        gin_cli.parse_gin(files, bindings)
        gin_cli.check_unbound_macros()
    except gin_cli.GinConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    _distributed_init(args)
    if args.dry_run:  # data is never read: do not build (or need the packages of) its readers
        gin.bind_parameter("train.train_data", None)
        gin.bind_parameter("train.eval_data", None)
    try:
        summary = train(dry_run=args.dry_run)
    except faults.WRITE_ERRORS:
        faults.exit_after_write_error()
    except (RuntimeError, ValueError) as e:  # gin: a REQUIRED binding (e.g. the model) missing,
        first = str(e).splitlines()[0] if str(e) else ""  # or a skipped configurable is used
        if not first.startswith(("Required bindings", "No configurable matching")):
            raise
        absent = "; ".join(f"{m} needs {d}, not installed"
                           for m, d in gin_cli.unavailable().items())
        print(f"gin config error: {first}" + (f" [not importable here: {absent}]" if absent
                                              else ""), file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"finished at step {summary['step']}, loss {summary['loss']:.4f}", flush=True)
    return 0


def console_main() -> None:
    sys.exit(main())

