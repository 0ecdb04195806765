"""Serving throughput: the HTTP server (scripts/serve) in-process, driven by 1, 16, 64, 256
concurrent streaming clients, batched (continuous batching, --max_batch rows) against sequential
serving (the same server with max_batch=1: one request at a time) as the baseline.

    python -m zhchat.benchmarks.serve_throughput --vocab=spm.model --run_dir=runs/sft
    python -m zhchat.benchmarks.serve_throughput --vocab=spm.model \\
        --gin_file=models/decoder_1b.gin --gin.VOCAB_SIZE=32128 --max_batch=64   # fresh init
    # CPU smoke run:
    python -m zhchat.benchmarks.serve_throughput --vocab=spm.model \\
        --gin_file=models/decoder_tiny.gin --gin.VOCAB_SIZE=3200 --max_tokens=16

Every request is a streamed /v1/completions of a fixed prompt with `ignore_eos`, so each yields
exactly --max_tokens tokens. Before each measured level the same clients run once with 2 tokens
(compiling that level's shapes). Reported per (mode, concurrency): requests/s and output tokens/s
over the level's wall time, and time to first token (first streamed text) and latency, mean / p50 /
p90. Every batch bucket is compiled before the clients start. One jsonl line each goes to --out,
stamped with the git commit and the date. The clients run in a second process (their own
interpreter lock); with a tiny model on CPU the numbers measure the Python HTTP/streaming path, not
the device. `--modes=backend` steps the batch backend directly (no HTTP, no engine thread) at each
level up to --max_batch: the device's share of serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PROMPTS = ["子曰：学而时习之，不亦说乎？", "请介绍一下长城的历史。", "北京是中国的首都，",
           "写一首关于春天的诗。", "今天天气很好，我们去公园散步吧。", "人工智能的发展"]


async def stream_request(port: int, body: dict) -> dict[str, Any]:
    """One streamed POST /v1/completions over a raw HTTP/1.1 connection: status, time to the first
    text event, latency and the completion tokens of the final usage."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                 + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding: chunked")
    out: dict[str, Any] = {"status": status, "ttft": None, "tokens": 0}
    buffer = b""
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            data = await reader.readexactly(size + 2) if size else b""
            data = data[:-2]
        else:
            data = await reader.read(65536)
        if not data:
            break
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            text = event.decode().removeprefix("data: ")
            if text == "[DONE]" or not text.startswith("{"):
                continue
            msg = json.loads(text)
            if out["ttft"] is None and msg.get("choices") and msg["choices"][0].get("text"):
                out["ttft"] = time.perf_counter() - start
            if msg.get("usage"):
                out["tokens"] = msg["usage"]["completion_tokens"]
            if "error" in msg:
                out["error"] = msg["error"]["message"]
    writer.close()
    out["latency"] = time.perf_counter() - start
    return out


async def drive(port: int, *, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests from `concurrency` concurrent clients; the level's statistics."""
    todo = list(range(requests))
    results: list[dict] = []

    async def client() -> None:
        while todo:
            i = todo.pop()
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True}
            results.append(await stream_request(port, body))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200 and "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    latency = [r["latency"] for r in ok]

    def stats(xs: list[float], name: str) -> dict:
        if not xs:
            return {}
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
        return {f"{name}_mean_s": statistics.fmean(xs), f"{name}_p50_s": statistics.median(xs),
                f"{name}_p90_s": q[8]}

    return {"concurrency": concurrency, "requests": requests, "errors": len(results) - len(ok),
            "wall_s": wall, "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            **stats(ttft, "ttft"), **stats(latency, "latency")}


def drive_level(port: int, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`drive` run to completion: the entry point of the clients' own process."""
    return asyncio.run(drive(port, concurrency=concurrency, requests=requests,
                             max_tokens=max_tokens))


def load(args: argparse.Namespace, gin_files: list[str], bindings: list[str]) -> tuple:
    """(model, params): a run's checkpoint, or a fresh init of the gin config (no checkpoint)."""
    import gin
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from zhchat.gin_configs import cli as gin_cli
    from zhchat.scripts.serve import cli

    if args.run_dir:
        return cli.load_model(args.run_dir, gin_files, bindings)[:2]
    gin.clear_config()
    gin_cli.parse_gin(gin_files, bindings)
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    shapes = {"decoder_input_tokens": (1, 8), "encoder_input_tokens": (1, 8)}
    dtype = jnp.dtype(args.param_dtype) if args.param_dtype else None
    cast = (lambda t: jax.tree.map(lambda x: x.astype(dtype), t)) if dtype else (lambda t: t)
    init = jax.jit(lambda key: cast(nn.unbox(model.init_params(key, shapes))))
    return model, init(jax.random.key(0))


def precompile(engine: Any, vocab: Any, max_tokens: int) -> None:
    """Compiles every batch bucket at the prompts' width before measuring (the arrival pattern
    of a level would otherwise compile new batch sizes inside its timed window)."""
    from zhchat.scripts.serve import rows

    backend = engine.backend
    longest = max(len(vocab.encode(p)) for p in PROMPTS) + int(engine.encoder_decoder)
    width = rows.fit(longest, backend.widths)
    if engine.encoder_decoder:
        backend.precompile([width], sorted({rows.fit(n, backend.widths) for n in (2, max_tokens)}))
    else:
        backend.precompile([width])


def backend_rate(backend: Any, vocab: Any, *, batch: int, max_tokens: int) -> dict:
    """`batch` rows prefilled together and stepped to `max_tokens` tokens each, on the batch
    backend alone (no HTTP, no engine thread, no streaming): the device's share of serving."""
    from zhchat.scripts.serve.rows import Row

    live = [Row(prompt=vocab.encode(PROMPTS[i % len(PROMPTS)]), max_tokens=max_tokens,
                ignore_eos=True) for i in range(batch)]
    start = time.perf_counter()
    for row, token in backend.admit(live):
        row.count, row.last = 1, token
    prefill = time.perf_counter() - start
    for _ in range(max_tokens - 1):
        for row, token in backend.step():
            row.count, row.last = row.count + 1, token
    wall = time.perf_counter() - start
    for row in live:
        backend.release(row)
    assert all(r.count == max_tokens for r in live), "a row missed a step"
    step_s = (wall - prefill) / max(max_tokens - 1, 1)
    return {"concurrency": batch, "requests": batch, "errors": 0, "wall_s": wall,
            "requests_per_s": batch / wall, "output_tokens_per_s": batch * max_tokens / wall,
            "prefill_s": prefill, "step_ms": 1e3 * step_s,
            "slots": getattr(backend, "slots_total", None)}


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from zhchat.gin_configs import cli as gin_cli

    gin_files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m zhchat.benchmarks.serve_throughput",
                                description=__doc__.split("\n")[0])
    p.add_argument("--vocab", required=True)
    p.add_argument("--run_dir", default=None, help="else a fresh init of the --gin_file model")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(concurrency, 32))")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--max_context", type=int, default=None)
    p.add_argument("--modes", default="batched,sequential",
                   help="also `backend`: the batch backend stepped directly, no HTTP (device share)")
    p.add_argument("--param_dtype", default=None, help="cast fresh parameters, e.g. bfloat16")
    p.add_argument("--out", default="serve_throughput.jsonl")
    args = p.parse_args(rest)
    if not args.run_dir and not gin_files:
        p.error("give --run_dir or --gin_file")
    unknown = set(args.modes.split(",")) - {"batched", "sequential", "backend"}
    if unknown:
        p.error(f"unknown --modes {sorted(unknown)} (batched, sequential, backend)")

    import jax

    from zhchat.scripts.serve.app import make_app
    from zhchat.scripts.serve.engine import make_engine
    from zhchat.tasks.vocabulary import Vocabulary

    vocab = Vocabulary(args.vocab)
    model, params = load(args, gin_files, bindings)
    levels = [int(c) for c in args.concurrency.split(",")]
    stamp = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "device": str(jax.devices()[0].device_kind), "model": args.run_dir or gin_files,
             "bindings": bindings, "max_tokens": args.max_tokens}
    with open(args.out, "a", encoding="utf-8") as out:
        for mode in args.modes.split(","):
            batch = 1 if mode == "sequential" else args.max_batch
            engine = make_engine(model, params, vocab, max_batch=batch,
                                 max_queue=max(levels + [args.requests]) + 8,
                                 context=args.max_context)
            t0 = time.perf_counter()
            precompile(engine, vocab, args.max_tokens)
            print(f"{mode}: compiled {len(engine.backend.shapes)} shapes in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            if mode == "backend":  # the batch backend alone, at each level up to max_batch
                for c in sorted({min(c, batch) for c in levels}):
                    backend_rate(engine.backend, vocab, batch=c, max_tokens=2)  # compile
                    row = {**stamp, "mode": mode, "max_batch": batch,
                           **backend_rate(engine.backend, vocab, batch=c,
                                          max_tokens=args.max_tokens)}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"{mode:>10} b={c:<4} {row['output_tokens_per_s']:9.1f} tok/s  step "
                          f"{row['step_ms']:.2f} ms  prefill {row['prefill_s']:.3f} s", flush=True)
                continue
            app = make_app(engine, vocab, model_name="bench", max_new_tokens=args.max_tokens,
                           timeout_s=3600)
            engine.start()
            # the clients run in a process of their own, so their parsing does not share the
            # server's interpreter lock (as real clients on other hosts would not)
            spawn = multiprocessing.get_context("spawn")
            with _server(app) as port, ProcessPoolExecutor(1, mp_context=spawn) as clients:
                for c in levels:
                    n = args.requests or max(c, 32)
                    clients.submit(drive_level, port, c, c, 2).result()  # compile this level
                    row = {**stamp, "mode": mode, "max_batch": batch, "clients": "own process",
                           **clients.submit(drive_level, port, c, n, args.max_tokens).result()}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"{mode:>10} c={c:<4} {row['requests_per_s']:8.2f} req/s "
                          f"{row['output_tokens_per_s']:9.1f} tok/s  ttft mean "
                          f"{row.get('ttft_mean_s', float('nan')):.3f} p50 "
                          f"{row.get('ttft_p50_s', float('nan')):.3f} p90 "
                          f"{row.get('ttft_p90_s', float('nan')):.3f} s  errors {row['errors']}",
                          flush=True)
            engine.stop()
    print(f"wrote {args.out}")
    return 0


def _server(app: Any):
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread (a context: yields the port)."""
    import contextlib
    import socket
    import threading

    import uvicorn

    @contextlib.contextmanager
    def run():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               backlog=4096))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield sock.getsockname()[1]
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()
    return run()


if __name__ == "__main__":
    sys.exit(main())
