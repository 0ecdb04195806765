"""Shared by the serving tests: tiny random-init run directories (config.gin + a step-0
checkpoint, no training), a uvicorn server in a background thread on a free port, and greedy
references through `TokenStreamer`."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import gin
import jax
import numpy as np

VOCAB_SIZE = 3200  # the 3000-piece test tokenizer + 100 sentinels, padded
CONTEXT = 128
DECODER = ("models/decoder_tiny.gin", [f"VOCAB_SIZE = {VOCAB_SIZE}",
                                       f"DecoderConfig.max_len = {CONTEXT}"])
T5 = ("models/t5_tiny.gin", [f"VOCAB_SIZE = {VOCAB_SIZE}"])
# user turns whose chat prompts have 21 to 55 tokens with the test tokenizer (widths 32 and 64)
TEXTS = ["你好", "长城有多长？请简单介绍一下。", "请写一首关于春天的短诗，要有花和雨。" * 2,
         "北京是中国的首都，有很多名胜古迹，比如故宫和天坛。", "一二三四五六七八九十" * 3]


def make_run(run_dir: str, preset: str, bindings: list[str], seed: int = 0) -> str:
    """A run directory whose config.gin and checkpoint hold a freshly initialised model."""
    import os

    import flax.linen as nn

    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import checkpoints

    gin.clear_config()
    try:
        gin_cli.parse_gin([preset], bindings)
        model = gin_cli.evaluate_macro("MODEL")
        config = gin.config_str()
    finally:
        gin.clear_config()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(config)
    shapes = {"decoder_input_tokens": (1, 8), "encoder_input_tokens": (1, 8)}
    params = jax.jit(lambda key: nn.unbox(model.init_params(key, shapes)))(jax.random.key(seed))
    ckpt = checkpoints.Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params}, force=True)
    ckpt.close()
    return run_dir


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[int]:
    """Serves `app` with uvicorn on 127.0.0.1 in a thread; yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


LONGEST = 50  # references are decoded this far once; a request's reference is their prefix
_REFERENCES: dict[tuple, list[list[int]]] = {}


def predict_references(model: Any, params: Any, prompts: list[list[int]], stops: list[int]
                       ) -> list[list[int]]:
    """Greedy ids of each prompt through the model's own `predict_batch` (all prompts in one
    padded batch, one compilation), LONGEST tokens or up to the first stop id (excluded)."""
    import jax.numpy as jnp

    from zhchat.tasks.vocabulary import pad_token_rows

    key = (id(model), tuple(map(tuple, prompts)), tuple(sorted(stops)))
    if key not in _REFERENCES:
        encdec = hasattr(model, "encode")
        tokens = jnp.asarray(pad_token_rows(prompts, left=not encdec))
        feature = "encoder_input_tokens" if encdec else "decoder_input_tokens"
        out = np.asarray(model.predict_batch(params, {feature: tokens}, jax.random.key(0),
                                             max_decode_length=LONGEST)).tolist()
        cut = lambda ids: ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
        _REFERENCES[key] = [cut(ids) for ids in out]
    return _REFERENCES[key]


def expected(ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """(ids, finish reason) of a request for `max_tokens` whose LONGEST-token reference is `ids`."""
    if max_tokens > LONGEST:
        raise ValueError(f"references go to {LONGEST} tokens")
    if len(ids) < min(LONGEST, max_tokens + 1):
        return ids, "stop" if len(ids) < max_tokens else "length"
    return ids[:max_tokens], "length"


def streamer_reference(model: Any, params: Any, prompt: list[int], max_tokens: int,
                       stops: list[int]) -> list[int]:
    """Greedy ids through the one-request `TokenStreamer` (the chat CLI's decoder)."""
    from zhchat.models import streaming

    streamer = streaming.TokenStreamer(model, temperature=0.0)
    return list(streamer.stream(params, prompt, jax.random.key(0), max_new_tokens=max_tokens,
                                stop_ids=stops))


def reply_text(vocab: Any, ids: list[int]) -> str:
    """The text the server sends for generated `ids`."""
    from zhchat.tasks import chat_template as ct

    return vocab.decode([vocab.im_end_id] + list(ids), stop_at_eos=False)[len(ct.IM_END):]


_LOADED: dict[str, tuple] = {}


def loaded(kind: str, root: Any) -> tuple[str, Any, Any]:
    """(run_dir, model, params) of the tiny "decoder" or "t5" run, made and loaded (through the
    CLI's loader) once per test session, so every test file shares one model object and with it
    the engines' compilations."""
    from zhchat.scripts.serve import cli

    if kind not in _LOADED:
        run_dir = make_run(str(root / f"{kind}_run"), *(DECODER if kind == "decoder" else T5))
        model, params, _ = cli.load_model(run_dir, [], [])
        _LOADED[kind] = (run_dir, model, params)
    return _LOADED[kind]


def run_engine(engine: Any, requests: list[dict], *, start: bool = True) -> list[tuple]:
    """Submits every request before the engine starts (so they share a batch) and returns each
    one's (ids, finish reason). Stops the engine afterwards."""
    import asyncio

    from zhchat.scripts.serve.engine import Finish

    async def main() -> list[tuple]:
        handles = [engine.submit(**r) for r in requests]
        if start:
            engine.start()
        out = []
        for h in handles:
            ids = []
            while not isinstance(item := await asyncio.wait_for(h.queue.get(), 120), Finish):
                ids.append(item)
            out.append((ids, item.reason))
        return out

    try:
        return asyncio.run(main())
    finally:
        engine.stop()
