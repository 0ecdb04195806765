"""Batched sampling throughput with the KV cache: ours (jitted `predict_batch`) vs HF `generate`.

Both sample exactly `new_tokens` tokens per row (EOS disabled on both sides) with top-k sampling from
bf16 weights of the same random-init architecture, on the same prompts. Tokens/s counts generated
tokens only (batch × new_tokens / wall time of the whole call, prefill included).

    python -m zhchat.benchmarks.decode_throughput --workload=decoder_1b --systems=ours
    python -m zhchat.benchmarks.decode_throughput --workload=decoder_1b --systems=hf

On a GPU run each system in its own process: JAX preallocates most of the device memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from zhchat.benchmarks import workloads


def _prompts(workload: workloads.Workload, batch: int, prompt_len: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(2, vocab, size=(batch, prompt_len), dtype=np.int32)


def run_ours(workload: workloads.Workload, *, batch: int, prompt_len: int, new_tokens: int,
             repeats: int, top_k: int, bindings: tuple[str, ...]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    model = workloads.load_model(workload, tuple(bindings) + (
        ("DecoderOnlyModel.eos_id = -1",) if workload.kind == "decoder"
        else ("EncoderDecoderModel.eos_id = -1",)))
    prompts = _prompts(workload, batch, prompt_len, model.config.vocab_size)
    key = "decoder_input_tokens" if workload.kind == "decoder" else "encoder_input_tokens"
    shapes = {"decoder_input_tokens": (1, 8), "decoder_target_tokens": (1, 8),
              "encoder_input_tokens": (1, 8)}
    init = jax.jit(lambda r: jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                          nn.unbox(model.init_params(r, shapes))))
    params = init(jax.random.key(0))
    batch_in = {key: jnp.asarray(prompts)}
    opts = dict(max_decode_length=new_tokens, temperature=1.0, top_k=top_k)
    t0 = time.perf_counter()
    out = model.predict_batch(params, batch_in, jax.random.key(1), **opts)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        out = model.predict_batch(params, batch_in, jax.random.key(2 + i), **opts)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    out = np.asarray(out)
    assert out.shape == (batch, new_tokens), out.shape
    return {"system": "zhchat", "first_call_s": compile_s, "times": times,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def run_hf(workload: workloads.Workload, *, batch: int, prompt_len: int, new_tokens: int,
           repeats: int, top_k: int, bindings: tuple[str, ...]) -> dict[str, Any]:
    import torch

    from zhchat.benchmarks.hf_baseline import hf_model

    ours = workloads.load_model(workload, bindings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(ours, workload).to(device=device, dtype=torch.bfloat16).eval()
    prompts = torch.as_tensor(_prompts(workload, batch, prompt_len, ours.config.vocab_size),
                              device=device, dtype=torch.long)
    opts = dict(do_sample=True, top_k=top_k, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=None, pad_token_id=0, use_cache=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), **opts)
        sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **opts)
            sync()
            times.append(time.perf_counter() - t)
    generated = out.shape[1] - (prompt_len if workload.kind == "decoder" else 1)
    assert generated == new_tokens, (out.shape, new_tokens)
    return {"system": "hf generate", "first_call_s": first, "times": times,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.decode_throughput")
    p.add_argument("--workload", default="decoder_1b", choices=sorted(workloads.WORKLOADS))
    p.add_argument("--systems", default="ours,hf")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--out", default=None, help="append results as json lines to this file")
    args, rest = p.parse_known_args(argv)
    bindings = tuple(r[len("--gin."):] for r in rest if r.startswith("--gin."))
    if any(not r.startswith("--gin.") for r in rest):
        p.error(f"unrecognized arguments: {rest}")
    w = workloads.get_workload(args.workload)
    runners = {"ours": run_ours, "hf": run_hf}
    results = {}
    for name in args.systems.split(","):
        r = runners[name](w, batch=args.batch, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, repeats=args.repeats, top_k=args.top_k,
                          bindings=bindings)
        r.update(workload=w.name, batch=args.batch, prompt_len=args.prompt_len,
                 new_tokens=args.new_tokens, median_s=statistics.median(r["times"]))
        r["tokens_per_s"] = args.batch * args.new_tokens / r["median_s"]
        results[name] = r
        workloads.emit(r, args.out)
    if "ours" in results and "hf" in results:
        print(f"{w.name}: ours {results['ours']['tokens_per_s']:.0f} tok/s, HF "
              f"{results['hf']['tokens_per_s']:.0f} tok/s, ratio "
              f"{results['ours']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
