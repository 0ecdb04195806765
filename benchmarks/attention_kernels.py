"""T5 attention kernels alone, forward + backward: the bucket kernel against cuDNN with a dense bias.

Each case is one T5 self-attention of a named shape with the bias built from its 32-bucket table
as the model builds it, differentiated in q, k, v and the table (what training runs):

- `cudnn_bias`: today's path: cuDNN flash attention with the [1, heads, q, k] bias (and its bias
  gradient) plus sequence lengths (unpacked rows) or a dense mask (packed rows);
- `cudnn_nobias`: cuDNN without any bias: the library's rate at this shape, an upper bound;
- `pallas[...]`: models/bucket_attention.py with the tile sizes named;
- `xla`: dense attention in XLA (the reference for the error column).

TFLOP/s counts 3x the forward's two matmuls (4 b h q k d, halved when causal), recomputation not
counted. The error is the max |difference| to XLA over outputs and every gradient, relative to
the reference's max |value| (bf16 inputs on both; none for `cudnn_nobias`). On the GPU each
bucket-kernel row also times its three passes alone (forward, dK/dV, dQ).

    python -m zhchat.benchmarks.attention_kernels --cases=t5_large_encoder,t5_large_decoder
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from zhchat.benchmarks import workloads

# name: batch, length, heads, head dim, causal (decoder bucketing), packed (mean document length)
CASES = {
    "t5_large_encoder": (64, 512, 16, 64, False, 0),
    "t5_large_decoder": (64, 114, 16, 64, True, 0),
    "t5_large_encoder_packed": (64, 512, 16, 64, False, 96),
    "t5_encoder_2048": (8, 2048, 16, 64, False, 0),
    "tiny_packed": (2, 96, 2, 16, False, 24),   # CPU smoke test (interpret mode)
}
TILES = {  # name: Blocks(fwd_q, fwd_k, fwd_warps, bwd, bwd_warps, dq_q, dq_k, dq_warps, stages,
    #                   [min_programs, near_sums]); "m": near sums in memory
    "f64x64w4.b32w4.q64x32w4": (64, 64, 4, 32, 4, 64, 32, 4, 2),
    "f128x64w4.b32w4.q128x32w4": (128, 64, 4, 32, 4, 128, 32, 4, 2),
    "f128x64w8.b64w8.q64x64w4": (128, 64, 8, 64, 8, 64, 64, 4, 2),
    "f64x64w4.b32w2.q64x64w4": (64, 64, 4, 32, 2, 64, 64, 4, 2),
    "f128x128w8.b16w2.q128x64w8": (128, 128, 8, 16, 2, 128, 64, 8, 2),
    "f64x64w4.b32w4.q64x32w4.s3": (64, 64, 4, 32, 4, 64, 32, 4, 3),
    "f64x64w4.b32w4m.q64x32w4": (64, 64, 4, 32, 4, 64, 32, 4, 2, 264, "memory"),
    "f64x64w4.b64w4m.q64x32w4": (64, 64, 4, 64, 4, 64, 32, 4, 2, 264, "memory"),
    "f64x64w4.b64w8m.q64x32w4": (64, 64, 4, 64, 8, 64, 32, 4, 2, 264, "memory"),
    "f64x64w4.b32w4.q64x32w4.p1024": (64, 64, 4, 32, 4, 64, 32, 4, 2, 1024),
    "f64x64w4.b32w4.q64x32w4.p4096": (64, 64, 4, 32, 4, 64, 32, 4, 2, 4096),
    "f64x64w4.b32w4.q64x32w4.p16384": (64, 64, 4, 32, 4, 64, 32, 4, 2, 16384),
    "f64x64w4.b64w4m.q64x32w4.p4096": (64, 64, 4, 64, 4, 64, 32, 4, 2, 4096, "memory"),  # default
}

def packed_segments(b: int, t: int, mean: int, rng) -> np.ndarray:
    """Segment ids [b, t]: `mean` 0 gives one document a row with right-padding (half to all of
    the row); otherwise documents of 8 to 2 * mean tokens back to back (the GPU tests use these)."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        if not mean:
            seg[r, : int(rng.integers(t // 2, t + 1))] = 1
            continue
        pos, sid = 0, 1
        while pos < t - 8:
            n = int(rng.integers(8, 2 * mean))
            seg[r, pos:pos + n], pos, sid = sid, pos + n, sid + 1
    return seg


def _case_fns(case: str, tiles: list[str]):
    import jax
    import jax.numpy as jnp

    from zhchat.models import bucket_attention as ba
    from zhchat.models import layers, t5_layers

    b, t, n, h, causal, mean = CASES[case]
    relpos = ba.Relpos(32, 128, bidirectional=not causal)
    seg = jnp.asarray(packed_segments(b, t, mean, np.random.default_rng(0)))
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    args = [jax.random.normal(k, (b, t, n, h), jnp.bfloat16) for k in keys[:3]]
    args.append(jax.random.normal(keys[3], (n, 32), jnp.float32))
    dout = jax.random.normal(keys[4], (b, t, n, h), jnp.bfloat16)
    pos = jnp.arange(t)
    onehot = jax.nn.one_hot(relpos.buckets(pos[None, :] - pos[:, None]), 32, dtype=jnp.bfloat16)
    lengths = t5_layers.padding_lengths(seg, seg)
    mask = layers.make_attention_mask(seg, seg, causal=causal)

    def generic(impl, with_bias=True):
        def fn(q, k, v, table):
            bias = jnp.einsum("hb,qkb->hqk", table.astype(jnp.bfloat16), onehot)[None]
            kw = dict(bias=bias if with_bias else None, scale=1.0, implementation=impl)
            if mean:
                return layers.dot_product_attention(q, k, v, mask=mask, **kw)
            return layers.dot_product_attention(q, k, v, is_causal=causal,
                                                query_seq_lengths=lengths.query,
                                                key_value_seq_lengths=lengths.kv, **kw)
        return fn

    fns = {"xla": generic("xla"), "cudnn_bias": generic("cudnn"),
           "cudnn_nobias": generic("cudnn", with_bias=False)}
    def kernel(blocks):
        return lambda q, k, v, table: ba.bucket_attention(
            q, k, v, table, segment_ids=seg, relpos=relpos, causal=causal, blocks=blocks)

    for name in tiles:
        fns[f"pallas[{name}]"] = kernel(ba.Blocks(*TILES[name]))
    flops = 3 * 4 * b * n * t * t * h * (0.5 if causal else 1.0)
    valid = (seg != 0)[:, :, None, None]

    def parts(name: str, repeats: int) -> dict[str, float]:
        """Seconds of the bucket kernel's three passes on their own (padded length)."""
        blocks = ba.Blocks(*TILES[name])
        q, k, v, table = args
        sp, q, k, v, do = ba.pad_to_tiles(blocks, seg, q, k, v, dout)
        fwd = jax.jit(lambda q, k, v, tb: ba._forward(q, k, v, tb, sp, relpos, causal, 1.0,
                                                      blocks, False))
        out, lse = fwd(q, k, v, table)
        delta, bias, bias_t, plan = ba.backward_inputs(table, out, do, relpos, causal, blocks)
        common = (q, k, v, do, lse, delta, sp)
        dkdv = jax.jit(lambda *a: ba._dkdv(*a, plan, causal, 1.0, blocks, False))
        dq = jax.jit(lambda *a: ba._dq(*a, causal, 1.0, blocks, False))
        return {"fwd_kernel_s": _time(fwd, (q, k, v, table), repeats),
                "dkdv_kernel_s": _time(dkdv, common + (bias_t,), repeats),
                "dq_kernel_s": _time(dq, common + (bias,), repeats),
                "near_classes": len(plan.classes)}

    return fns, args, dout, valid, flops, parts


def _time(fn, args, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_case(case: str, systems: list[str], tiles: list[str], repeats: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    fns, args, dout, valid, flops, parts = _case_fns(case, tiles)
    rows, reference = [], None
    for name in ["xla"] + [s for s in fns if s != "xla"]:
        if name != "xla" and not any(name.startswith(s) for s in systems):
            continue
        fn = fns[name]

        def step(q, k, v, table, fn=fn):
            out, vjp = jax.vjp(fn, q, k, v, table)
            return (jnp.where(valid, out, 0),) + vjp(jnp.where(valid, dout, 0))
        row = {"case": case, "system": name, "shape": CASES[case]}
        try:
            jitted = jax.jit(step)
            got = [np.asarray(x, np.float32) for x in jitted(*args)]
            if reference is None:
                reference = got
            if name != "cudnn_nobias":  # another function: its difference means nothing
                row["rel_error"] = max(float(np.abs(g - r).max() / (np.abs(r).max() + 1e-30))
                                       for g, r in zip(got, reference))
            row["seconds"] = _time(jitted, args, repeats)
            row["tflops"] = flops / row["seconds"] / 1e12
            row["fwd_seconds"] = _time(jax.jit(fn), args, repeats)
            if name.startswith("pallas[") and jax.default_backend() == "gpu":
                row.update(parts(name[len("pallas["):-1], repeats))
        except Exception as e:  # noqa: BLE001 — a tile config the compiler rejects is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--systems", default="cudnn_bias,cudnn_nobias,pallas")
    p.add_argument("--tiles", default="f64x64w4.b32w4.q64x32w4,f64x64w4.b64w4m.q64x32w4.p4096")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="append results as json lines to this file")
    args = p.parse_args(argv)
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; cases: {sorted(CASES)}")
        for row in run_case(case, args.systems.split(","), args.tiles.split(","), args.repeats):
            workloads.emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
