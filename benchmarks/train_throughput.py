"""Training throughput of the real trainer step (forward, backward, clipping, AdamW update).

Uses the trainer's own pieces (`state_init.StateInitializer`, `step_fns.jitted_steps`: the same jitted,
donated, sharded step that `trainer.train` runs) on synthetic token batches of a workload's shapes,
and reports step time, tokens/s/device, TFLOP/s/device and MFU (PaLM appendix-B FLOPs with causal
attention counted as half), peak device memory and compile time.

    python -m zhchat.benchmarks.train_throughput --workload=decoder_1b --steps=10 \
        [--mesh=-1,1,1] [--microbatches=1] [--gin.DecoderConfig.remat_policy="'full'"] \
        [--profile_dir=DIR] [--breakdown] [--gin.make_optimizer.mu_dtype="'bfloat16'"] \
        [--unpacked] [--hlo_out=FILE] [--data=CACHE_DIR [--data_batches=8]]

`--data` times the step on real rows of a packed cache (what pretraining reads: several documents
a row, padding at the end), cycling through its first `--data_batches` batches in reader order;
the result carries the rows' documents per row. Without it, rows are synthetic, one document each
(the upper bound).

`--unpacked` drops the decoder batch's segment ids and positions (one document per row, as the HF
baseline's batch), so attention takes the static causal path; `--hlo_out` writes the compiled step's
optimised HLO (to map profile kernel names such as `loop_add_fusion_2` onto the ops they fuse).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from zhchat.benchmarks import trace_summary, workloads
from zhchat.models import flops as flops_lib
from zhchat.trainer import optimizers, partitioning, state_init, step_fns


def _peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run(workload: workloads.Workload, *, steps: int, warmup: int, mesh_shape: tuple[int, ...],
        microbatches: int = 1, bindings: tuple[str, ...] = (),
        peak_flops: float = flops_lib.H100_BF16_PEAK_FLOPS, profile_dir: str | None = None,
        profile_steps: int = 3, breakdown: bool = False, packed: bool = True,
        hlo_out: str | None = None, skip_nonfinite: bool = True,
        data: str | None = None, data_batches: int = 8) -> dict[str, Any]:
    """Compiles and times `steps` steps after `warmup` ones; returns the metrics dict. `data`: a
    packed cache whose first `data_batches` batches are cycled instead of a synthetic one. With
    `profile_dir`, `profile_steps` more steps are traced there and summarised (trace_summary);
    with `breakdown`, the forward and forward + backward are also timed alone."""
    model = workloads.load_model(workload, bindings)
    tx = optimizers.make_optimizer(learning_rate=1e-4)
    partitioner = partitioning.Partitioner(mesh_shape=mesh_shape)
    data_stats = None
    if data:
        workload, host_batches, data_stats = workloads.cache_batches(data, workload, data_batches)
    else:
        host_batches = [workloads.synthetic_batch(workload, model.config.vocab_size, packed=packed)]
    host_batch = host_batches[0]
    if data_stats is not None and hasattr(model.config, "sort_packed_rows"):  # the decoder
        data_stats.update(_attention_paths(model.config, host_batches,
                                           partitioner.data_parallel_size))
    elif data_stats is not None:  # T5: packed cross-attention (models/cross_attention.py)
        data_stats.update(_cross_paths(model.config, host_batches,
                                       partitioner.data_parallel_size))
    top = max(int(b["decoder_input_tokens"].max()) for b in host_batches)
    if top >= model.config.vocab_size:
        raise ValueError(f"{data} holds token id {top}, outside the model's vocab_size "
                         f"{model.config.vocab_size}: bind --gin.VOCAB_SIZE to the cache's vocabulary")
    shapes = {k: (v.shape[0] // microbatches,) + v.shape[1:] for k, v in host_batch.items()}
    rng = jax.random.key(0)
    init = state_init.StateInitializer(model, tx, partitioner, shapes, rng)
    state = init.init()
    with partitioner.activate():
        step, _ = step_fns.jitted_steps(model.loss_fn, microbatches, init.shardings, partitioner,
                                        skip_nonfinite)
        batches = [jax.device_put(b, partitioner.batch_sharding) for b in host_batches]
        batch = batches[0]
        t0 = time.perf_counter()
        lowered = step.lower(state, batch, rng)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        if hlo_out:
            with open(hlo_out, "w") as f:
                f.write(compiled.as_text())
        for _ in range(max(warmup, 1)):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        first_loss = float(metrics["loss"])
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batches[i % len(batches)], rng)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
        state, profile = _profile(compiled, state, batch, rng, profile_dir, profile_steps)
        parts = _breakdown(model, state, batch, steps) if breakdown else None
    n = jax.device_count()
    ex_flops = workloads.flops_per_example(model, workload)
    tokens = workload.batch_size * workloads.tokens_per_example(workload)
    cfg = model.config
    return {
        "system": "zhchat", "workload": workload.name, "device": jax.devices()[0].device_kind,
        "num_devices": n, "mesh": dict(partitioner.mesh.shape),
        "versions": {"jax": jax.__version__, "flax": __import__("flax").__version__},
        "batch_size": workload.batch_size, "seq_len": workload.seq_len,
        "inputs_len": workload.inputs_len, "microbatches": microbatches,
        "skip_nonfinite": skip_nonfinite,
        "packed": packed and workload.kind == "decoder", "data": data, "data_stats": data_stats,
        "num_params": model.num_params(), "steps": steps,
        "config": {k: getattr(cfg, k) for k in ("remat_policy", "scan_layers", "attention_impl",
                                                "dtype", "max_segments_per_row")
                   if hasattr(cfg, k)},
        "step_time_s": step_s, "tokens_per_s_per_device": tokens / step_s / n,
        "tflops_per_device": ex_flops * workload.batch_size / step_s / n / 1e12,
        "mfu": ex_flops * workload.batch_size / step_s / (n * peak_flops),
        "compile_s": compile_s, "peak_memory_gib": _peak_memory_gib(),
        "loss_first": first_loss, "loss_last": float(metrics["loss"]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "profile": profile, "breakdown": parts,
    }


def _attention_paths(cfg, host_batches, groups: int) -> dict[str, float]:
    """Shares of the batches on each attention path (models/attention.py) on a GPU: one document
    a row (plain causal), documents fitting the segment table (packed kernel; rows sorted as the
    decoder sorts them), the rest (dense mask). Prefix-LM rows count as their causal call's path
    when they split into two calls (models/prefix_attention.py: inputs leading each segment, both
    tables fitting; `prefix_split_batches` is that share), else as the dense mask."""
    from zhchat.models import attention, prefix_attention

    paths, split = [], []
    for b in host_batches:
        seg = jax.numpy.asarray(b["decoder_segment_ids"])
        prefix = b.get("decoder_causal_attention")
        splits = prefix is None or cfg.split_prefix_attention
        order = attention.sort_rows(seg, groups) if cfg.sort_packed_rows and splits else None
        if order is not None:
            seg = attention.permute_rows(seg, order)
        info = attention.segment_info(seg, cfg.max_segments_per_row, groups=groups)
        path = "causal" if info.unpacked else "packed" if info.fits else "masked"
        if prefix is not None:
            prefix = jax.numpy.asarray(prefix)
            if order is not None:
                prefix = attention.permute_rows(prefix, order)
            p_info = prefix_attention.prefix_info(seg, prefix, cfg.max_segments_per_row,
                                                  groups=groups)
            splits = splits and bool(p_info.leading & attention.table_fits(p_info.segments)
                                     & attention.table_fits(p_info.inputs))
            split.append(splits)
            path = path if splits else "masked"
        paths.append(path)
    out = {f"{p}_batches": paths.count(p) / len(paths) for p in ("causal", "packed", "masked")}
    if split:
        out["prefix_split_batches"] = sum(split) / len(split)
    return out


def _cross_paths(cfg, host_batches, groups: int) -> dict[str, float]:
    """Share of the batches whose cross-attention takes cuDNN's packed layout on a GPU (with
    `packed_cross_attention`: the decoder's and encoder's segments pair and fit the tables); the
    rest take the dense mask."""
    from zhchat.models import cross_attention

    if not cfg.packed_cross_attention:  # off (the default): every batch takes the dense mask
        return {"cross_packed_batches": 0.0}
    packed = []
    for b in host_batches:
        info = cross_attention.cross_info(jax.numpy.asarray(b["decoder_segment_ids"]),
                                          jax.numpy.asarray(b["encoder_segment_ids"]),
                                          cfg.max_segments_per_row, groups=groups)
        packed.append(bool(info.paired & info.queries.fits & info.keys.fits))
    return {"cross_packed_batches": sum(packed) / len(packed)}


def _breakdown(model, state, batch, steps: int) -> dict[str, float]:
    """Seconds of the forward (loss) and forward + backward (loss and gradients) alone, timed like
    the step; the rest of the step is clipping + the optimizer update."""
    fns = {"forward_s": jax.jit(lambda p, b: model.loss_fn(p, b, None)[0]),
           "forward_backward_s": jax.jit(jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None)[0]))}
    out = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(state.params, batch))
        t0 = time.perf_counter()
        for _ in range(steps):
            res = fn(state.params, batch)
        jax.block_until_ready(res)
        out[name] = (time.perf_counter() - t0) / steps
    return out


def _profile(compiled, state, batch, rng, profile_dir: str | None, steps: int
             ) -> tuple[Any, dict | None]:
    """Traces `steps` steps into `profile_dir`; returns the new state (the step donates the old
    one) and the kernel-time summary (or the reason there is none, e.g. no kernels on CPU)."""
    if not profile_dir:
        return state, None
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
    try:
        return state, trace_summary.summarize_dir(profile_dir, steps=steps)
    except (FileNotFoundError, ValueError) as e:
        return state, {"error": str(e)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.train_throughput")
    p.add_argument("--workload", default="decoder_1b", choices=sorted(workloads.WORKLOADS))
    p.add_argument("--batch_size", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--inputs_len", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    p.add_argument("--profile_dir", default=None, help="trace extra steps here (perfetto + xplane)")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the forward and forward + backward alone")
    p.add_argument("--unpacked", action="store_true",
                   help="decoder batch without segment ids / positions (static causal attention)")
    p.add_argument("--hlo_out", default=None, help="write the compiled step's optimised HLO here")
    p.add_argument("--out", default=None, help="append the result as a json line to this file")
    p.add_argument("--data", default=None, help="a packed cache: time real rows from it")
    p.add_argument("--data_batches", type=int, default=8, help="batches of --data to cycle")
    p.add_argument("--no_skip_nonfinite", action="store_true",
                   help="without the trainer's skip of non-finite steps (to time its select)")
    args, rest = p.parse_known_args(argv)
    bindings = tuple(r[len("--gin."):] for r in rest if r.startswith("--gin."))
    if any(not r.startswith("--gin.") for r in rest):
        p.error(f"unrecognized arguments: {rest}")
    w = workloads.get_workload(args.workload, batch_size=args.batch_size, seq_len=args.seq_len,
                               inputs_len=args.inputs_len)
    result = run(w, steps=args.steps, warmup=args.warmup,
                 mesh_shape=tuple(int(x) for x in args.mesh.split(",")),
                 microbatches=args.microbatches, bindings=bindings, profile_dir=args.profile_dir,
                 profile_steps=args.profile_steps, breakdown=args.breakdown,
                 packed=not args.unpacked, hlo_out=args.hlo_out,
                 skip_nonfinite=not args.no_skip_nonfinite, data=args.data,
                 data_batches=args.data_batches)
    if not np.isfinite(result["loss_last"]):
        print(f"non-finite loss {result['loss_last']}", file=sys.stderr)
    workloads.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
