"""The decode engine: a bounded request queue feeding one background thread that runs the batch
backend (decoder_batch.DecoderBatch, continuous; encdec_batch.EncDecBatch, static) and pushes
every sampled token to its request's asyncio queue.

The thread does all device work, so the event loop never blocks on it; results of one iteration
reach the loop in one `call_soon_threadsafe`. An iteration: free the rows of cancelled requests,
admit waiting requests into free slots (one prefill call), run one step for every live row, and
deliver. A request ends with `Finish("stop")` when it samples a stop id (EOS, `<|im_end|>`; the id
is not delivered), `Finish("length")` at its max_tokens, or `Finish("error", message)` if the
engine fails or shuts down. Cancelling (client gone, stop string, timeout) frees its slot at the
next iteration; a cancelled request delivers nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import threading
import traceback
from typing import Any, Sequence

from zhchat.scripts.serve.rows import Row

log = logging.getLogger("zhchat.serve")


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or failed)."""


@dataclasses.dataclass(frozen=True)
class Finish:
    reason: str            # "stop", "length" or "error"
    message: str = ""


class Handle:
    """One request: its row, the queue its tokens (int) and its Finish arrive on, cancellation."""

    def __init__(self, engine: "Engine", row: Row, loop: asyncio.AbstractEventLoop):
        self.engine, self.row, self.loop = engine, row, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Stops generation for this request (idempotent; safe from any thread)."""
        if not self.cancelled:
            self.cancelled = True
            self.engine._forget(self)


class Engine:
    """Owns the backend and the decode thread; `submit` from the event loop, `start`/`stop`."""

    def __init__(self, backend: Any, *, stop_ids: Sequence[int], max_queue: int = 256,
                 encoder_decoder: bool = False, idle_wait_s: float = 0.5):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.backend, self.max_queue = backend, max_queue
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self.context = backend.context
        self.encoder_decoder = encoder_decoder  # prompts end with EOS (the T5's input format)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None
        self._idle_wait_s = idle_wait_s
        self._seeds = random.Random()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zhchat-decode", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"running": self.backend.active(), "waiting": len(self._waiting)}

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               ignore_eos: bool = False, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queues a request (call from the event loop); raises QueueFull / EngineStopped."""
        if self.failure or self._stopping:
            raise EngineStopped(self.failure or "the server is shutting down")
        if not prompt or max_tokens < 1:
            raise ValueError("a request needs a prompt and max_tokens >= 1")
        if len(prompt) + max_tokens > self.context:
            raise ValueError(f"prompt {len(prompt)} + max_tokens {max_tokens} > {self.context}")
        row = Row(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, ignore_eos=ignore_eos,
                  seed=self._seeds.getrandbits(31) if seed is None else seed)
        handle = Handle(self, row, loop or asyncio.get_running_loop())
        row.handle = handle
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max_queue="
                                f"{self.max_queue})")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def _forget(self, handle: Handle) -> None:
        with self._cv:
            try:
                self._waiting.remove(handle)
            except ValueError:
                pass  # already decoding: the loop frees its slot
            self._cv.notify()

    # ---- the decode thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self.backend.active()):
                        self._cv.wait(self._idle_wait_s)
                    if self._stopping:
                        return
                    joiners = []
                    while self._waiting and len(joiners) < self.backend.free_slots():
                        joiners.append(self._waiting.popleft())
                out: list[tuple[Handle, Any]] = []
                for row in list(self._live_rows()):
                    if row.handle.cancelled:
                        self._end(row, None, out)
                joiners = [h for h in joiners if not h.cancelled]
                if joiners:
                    self._collect(self.backend.admit([h.row for h in joiners]), out)
                if self.backend.active():
                    self._collect(self.backend.step(), out)
                self._deliver(out)
        except Exception as e:  # noqa: BLE001  (a device or compile failure ends the engine)
            self.failure = f"the decode engine failed: {type(e).__name__}: {str(e)[:300]}"
            log.error("decode engine failed:\n%s", traceback.format_exc())
            self._fail_all(self.failure)

    def _live_rows(self) -> list[Row]:
        return [r for r in getattr(self.backend, "slots", []) if r is not None]

    def _collect(self, sampled: list[tuple[Row, int]], out: list) -> None:
        for row, token in sampled:
            row.count += 1
            row.last = token
            if row.handle.cancelled:
                self._end(row, None, out)
            elif token in self.stop_ids and not row.ignore_eos:
                self._end(row, Finish("stop"), out)
            else:
                out.append((row.handle, token))
                if row.count >= row.max_tokens:
                    self._end(row, Finish("length"), out)

    def _end(self, row: Row, finish: Finish | None, out: list) -> None:
        self.backend.release(row)
        row.handle.done = True
        if finish is not None:
            out.append((row.handle, finish))

    @staticmethod
    def _deliver(out: list[tuple[Handle, Any]]) -> None:
        by_loop: dict[Any, list] = {}
        for handle, item in out:
            by_loop.setdefault(handle.loop, []).append((handle, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that event loop has closed: nobody is listening

    def _fail_all(self, message: str) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        out = [(h, Finish("error", message)) for h in waiting]
        for row in self._live_rows():
            try:
                self.backend.release(row)
            except Exception:  # noqa: BLE001
                pass
            out.append((row.handle, Finish("error", message)))
        self._deliver(out)


def _put_all(items: list[tuple[Handle, Any]]) -> None:
    for handle, item in items:
        if not handle.cancelled or isinstance(item, Finish):
            handle.queue.put_nowait(item)


def make_engine(model: Any, params: Any, vocab: Any, *, max_batch: int = 8, max_queue: int = 256,
                context: int | None = None, width_base: int = 32, margin: int | None = None
                ) -> Engine:
    """The engine for a decoder (continuous batching) or a T5 (static batches). `context` caps
    prompt + max_tokens (default: the decoder's max_len; 512 for a T5, which has no position
    limit). Stops on EOS and `<|im_end|>` (and a T5's pad), as the chat CLI does."""
    from zhchat.models.decoder_model import DecoderOnlyModel
    from zhchat.scripts.serve.decoder_batch import DecoderBatch
    from zhchat.scripts.serve.encdec_batch import EncDecBatch

    if model.config.vocab_size < vocab.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                         f"tokenizer {vocab.path} ({vocab.vocab_size}): checkpoint and tokenizer "
                         "differ")
    stops = {vocab.eos_id, vocab.im_end_id}
    if isinstance(model, DecoderOnlyModel):
        limit = model.config.max_len
        context = min(context or limit, limit)
        backend: Any = DecoderBatch(model, params, max_batch=max_batch, context=context,
                                    width_base=width_base, margin=margin)
    else:
        context = context or 512
        stops.add(vocab.pad_id)  # a T5 pads after its EOS
        backend = EncDecBatch(model, params, max_batch=max_batch, context=context,
                              width_base=width_base)
    return Engine(backend, stop_ids=sorted(stops), max_queue=max_queue,
                  encoder_decoder=not isinstance(model, DecoderOnlyModel))
