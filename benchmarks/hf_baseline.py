"""HF transformers + PyTorch baseline: the same architecture, size, batch, lengths and optimizer.

Builds `LlamaForCausalLM` / `T5ForConditionalGeneration` from our gin preset's config (random init),
trains on the same synthetic batches with bf16 autocast, SDPA attention and fused AdamW (global-norm
clipping 1.0, as our trainer), optionally under `torch.compile`, and reports the same metrics as
benchmarks/train_throughput.py. Decoding throughput lives in benchmarks/decode_throughput.py.

    python -m zhchat.benchmarks.hf_baseline --workload=decoder_1b --steps=10 [--compile] \
        [--data=CACHE_DIR]

`--data` trains on real packed rows of a cache, as benchmarks/train_throughput.py --data does. HF
has no packed-row path for SDPA: the rows go in as hf_trainer feeds them, a block-diagonal causal
[batch, 1, len, len] boolean mask and per-document `position_ids`, so SDPA runs its masked
(memory-efficient) kernel instead of flash attention; the loss is hf_trainer's weighted token loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from zhchat.benchmarks import hf_trainer, workloads
from zhchat.models import flops as flops_lib


def hf_model(model: Any, workload: workloads.Workload) -> Any:
    """The transformers model equivalent to our wrapper's config (random init, fp32 params, SDPA)."""
    return hf_trainer.reference_model(model.config, attention="sdpa")


def torch_batch(batch: dict[str, Any], workload: workloads.Workload, device: str) -> dict[str, Any]:
    """Our numpy batch as HF keyword arguments: Llama shifts `labels` itself (labels = inputs);
    T5 right-shifts `labels` into its decoder inputs."""
    import torch

    t = lambda k: torch.as_tensor(batch[k], dtype=torch.long, device=device)  # noqa: E731
    if workload.kind == "decoder":
        return {"input_ids": t("decoder_input_tokens"), "labels": t("decoder_input_tokens")}
    return {"input_ids": t("encoder_input_tokens"), "labels": t("decoder_target_tokens")}


def run(workload: workloads.Workload, *, steps: int, warmup: int, compile_model: bool,
        device: str, bindings: tuple[str, ...] = (), peak_flops: float = flops_lib.H100_BF16_PEAK_FLOPS,
        data: str | None = None, data_batches: int = 8) -> dict[str, Any]:
    """Times `steps` warm training steps and returns the metrics dict (`data`: real packed rows
    from that cache, its first `data_batches` batches cycled)."""
    import torch

    ours = workloads.load_model(workload, bindings)
    model = hf_model(ours, workload).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=device.startswith("cuda"))
    data_stats, host_batches = None, None
    if data:
        workload, host_batches, data_stats = workloads.cache_batches(data, workload, data_batches)
    batch = torch_batch(workloads.synthetic_batch(workload, ours.config.vocab_size), workload, device)
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                              dtype=torch.bfloat16)
    calls = [0]

    def step(m):
        with autocast:
            if host_batches is None:
                loss = m(**batch).loss
            else:
                rows = host_batches[calls[0] % len(host_batches)]
                calls[0] += 1
                logits = hf_trainer.forward_logits(m, rows, device=device)
                loss, _ = hf_trainer.token_loss(logits, rows, z_loss=0.0, device=device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fwd = torch.compile(model) if compile_model else model
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        loss = step(fwd)
    sync()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(fwd)
        sync()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    ex_flops = workloads.flops_per_example(ours, workload)
    tokens = workload.batch_size * workloads.tokens_per_example(workload)
    return {
        "system": "hf+torch" + ("+compile" if compile_model else ""), "workload": workload.name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "batch_size": workload.batch_size, "seq_len": workload.seq_len,
        "inputs_len": workload.inputs_len, "num_params": n_params, "steps": steps,
        "data": data, "data_stats": data_stats,
        "step_time_s": step_s, "tokens_per_s_per_device": tokens / step_s,
        "tflops_per_device": ex_flops * workload.batch_size / step_s / 1e12,
        "mfu": ex_flops * workload.batch_size / step_s / peak_flops,
        "warmup_and_compile_s": compile_s,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if device.startswith("cuda") else None),
        "final_loss": float(loss.detach().float().cpu()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.hf_baseline")
    p.add_argument("--workload", default="decoder_1b", choices=sorted(workloads.WORKLOADS))
    p.add_argument("--batch_size", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--inputs_len", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--gin.", dest="bindings", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", default=None, help="a packed cache: train on real rows from it")
    p.add_argument("--data_batches", type=int, default=8, help="batches of --data to cycle")
    p.add_argument("--out", default=None, help="append the result as a json line to this file")
    args, rest = p.parse_known_args(argv)
    bindings = list(args.bindings) + [r[len("--gin."):] for r in rest if r.startswith("--gin.")]
    unknown = [r for r in rest if not r.startswith("--gin.")]
    if unknown:
        p.error(f"unrecognized arguments: {unknown}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    w = workloads.get_workload(args.workload, batch_size=args.batch_size, seq_len=args.seq_len,
                               inputs_len=args.inputs_len)
    result = run(w, steps=args.steps, warmup=args.warmup, compile_model=args.compile,
                 device=device, bindings=tuple(bindings), data=args.data,
                 data_batches=args.data_batches)
    workloads.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
