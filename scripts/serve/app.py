"""The FastAPI app: OpenAI-style endpoints over an `Engine` (`make_app(engine, vocab, ...)`).

Prompts: chat messages are rendered with the shared chat template exactly as scripts/chat.py
renders them (`chat_template.encode_prompt`, chat tokens removed from the text by
`clean_user_text`; a T5 input ends with EOS), without its left truncation: a prompt that does not
fit is refused. Limits (HTTP 400, OpenAI error JSON, code `context_length_exceeded`): prompt +
max_tokens must fit the context (`engine.context`); max_tokens may not exceed the server's
`max_new_tokens` and defaults to min(max_new_tokens, context - prompt).

Timeouts: each request has `timeout_s` from its arrival. Until the first text is ready (queued,
prefilling) a timeout is HTTP 504; a non-streamed reply past its deadline is 504 too; a stream
past its deadline gets an error event and a last chunk with finish_reason "length", then
`data: [DONE]`. A full queue is 503 with Retry-After. Schema errors are 422 and unparsable JSON
400, both as OpenAI error JSON; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from zhchat.scripts.chat import clean_user_text
from zhchat.scripts.serve import protocol as pr
from zhchat.scripts.serve.engine import Engine, EngineStopped, Finish, QueueFull
from zhchat.scripts.serve.text import TextStream
from zhchat.tasks import chat_template as ct

log = logging.getLogger("zhchat.serve")


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


class Generation:
    """One submitted request: yields (text, finish_reason or None) pieces as tokens arrive."""

    def __init__(self, handle: Any, text: TextStream, deadline: float, prompt_tokens: int):
        self.handle, self.text, self.deadline = handle, text, deadline
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """Text as it decodes; the tokens already queued are taken together (one piece), so a
        client that falls behind gets fewer, longer chunks."""
        queue = self.handle.queue
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                try:
                    items = [await asyncio.wait_for(queue.get(), max(remaining, 0))]
                except asyncio.TimeoutError:
                    raise _Timeout() from None
                while not queue.empty():
                    items.append(queue.get_nowait())
                text = []
                for item in items:
                    if isinstance(item, Finish):
                        if item.reason == "cancelled":
                            raise _Disconnected()
                        if item.reason == "error":
                            raise pr.ApiError(500, item.message, type="server_error")
                        yield "".join(text) + self.text.flush(), item.reason
                        return
                    self.completion_tokens += 1
                    text.append(self.text.push(item))
                    if self.text.stopped:
                        yield "".join(text), "stop"
                        return
                if any(text):
                    yield "".join(text), None
        finally:
            self.handle.cancel()  # finished, timed out, failed or abandoned: free the slot

    def usage(self) -> dict[str, int]:
        return pr.usage(self.prompt_tokens, self.completion_tokens)


def make_app(engine: Engine, vocab: Any, *, model_name: str, max_new_tokens: int = 256,
             timeout_s: float = 600.0) -> FastAPI:
    """The app; the caller starts and stops `engine`."""
    app = FastAPI(title="zhchat", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.add_middleware(RequestLog)

    @app.exception_handler(pr.ApiError)
    async def _api_error(request: Request, e: pr.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = next(err for err in errors if err.get("type") == "json_invalid")
            return JSONResponse(pr.error_body(
                f"the request body is not valid JSON: {detail.get('ctx', {}).get('error', '')}"
                .rstrip(": "), code="invalid_json"), status_code=400)
        return JSONResponse(pr.error_body("; ".join(_describe(err) for err in errors[:8]),
                                          code="invalid_fields"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(pr.error_body(message, code=str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(pr.error_body("internal server error", type="server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name,
                "context": engine.context, **engine.stats()}
        if engine.failure:
            body["error"] = engine.failure
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return pr.models_response(model_name, created)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, model_name)
        return pr.models_response(model_name, created)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: pr.ChatCompletionRequest) -> Any:
        body.check_supported()
        _check_model(body.model, model_name)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": clean_user_text(m.text())} for m in body.messages]
        try:
            ct.validate(messages)
        except ct.ChatFormatError as e:
            raise pr.ApiError(400, f"messages: {e}", param="messages") from None
        if messages[-1]["role"] == "assistant":
            raise pr.ApiError(400, "messages: the last message is already an assistant reply",
                              param="messages")
        return await _respond(request, ct.encode_prompt(vocab, messages), body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: pr.CompletionRequest) -> Any:
        body.check_supported()
        _check_model(body.model, model_name)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < vocab.vocab_size]
            if bad:
                raise pr.ApiError(400, f"prompt token ids out of range [0, {vocab.vocab_size}): "
                                  f"{bad[:5]}", param="prompt")
            ids = list(prompt)
        else:
            ids = vocab.encode(prompt[0] if isinstance(prompt, list) else prompt) \
                if prompt else []
        return await _respond(request, ids, body, chat=False)

    async def _respond(request: Request, prompt: list[int], body: Any, *, chat: bool) -> Any:
        """Submits the prompt; streams the reply as server-sent events or returns it whole."""
        gen = _submit(request, prompt, body, "messages" if chat else "prompt")
        rid = pr.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return await _stream(request, gen, body, chat=chat, rid=rid)
        text, finish = await _collect(request, gen)
        make = pr.chat_response if chat else pr.completion_response
        return make(rid, model_name, text, finish, gen.usage())

    def _submit(request: Request, prompt: list[int], body: pr._Sampling, param: str
                ) -> Generation:
        arrival = request.scope.get("zhchat.arrival", time.monotonic())
        n = len(prompt)
        if n == 0:
            raise pr.ApiError(400, f"{param}: the prompt is empty", param=param)
        if engine.encoder_decoder:
            prompt, n = list(prompt) + [vocab.eos_id], n + 1
        max_tokens = _max_tokens(n, body.token_limit(), context=engine.context,
                                 cap=max_new_tokens, param=param)
        request.state.usage = (n, 0)
        try:
            handle = engine.submit(prompt, max_tokens=max_tokens, temperature=body.temperature,
                                   top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                   ignore_eos=body.ignore_eos)
        except QueueFull as e:
            raise pr.ApiError(503, f"the server is busy: {e}; retry shortly", type="server_error",
                              code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise pr.ApiError(503, str(e), type="server_error", code="engine_unavailable") from None
        return Generation(handle, TextStream(vocab, body.stop_list()), arrival + timeout_s, n)

    async def _collect(request: Request, gen: Generation) -> tuple[str, str]:
        parts, finish = [], "length"
        watcher = asyncio.create_task(_watch_disconnect(request, gen.handle))
        try:
            async for piece, reason in gen.pieces():
                parts.append(piece)
                finish = reason or finish
        except _Timeout:
            raise pr.ApiError(504, f"the request did not finish within the server's timeout of "
                              f"{timeout_s:g} s (--timeout_s)", type="timeout_error",
                              code="timeout") from None
        except _Disconnected:
            raise pr.ApiError(499, "the client closed the connection") from None
        finally:
            watcher.cancel()
            request.state.usage = (gen.prompt_tokens, gen.completion_tokens)
        return "".join(parts), finish

    async def _stream(request: Request, gen: Generation, body: pr._Sampling, *, chat: bool,
                      rid: str) -> StreamingResponse:
        created_at = int(time.time())
        pieces = gen.pieces()
        watcher = asyncio.create_task(_watch_disconnect(request, gen.handle))
        try:  # errors until the first text are plain HTTP errors
            first = await pieces.__anext__()
        except _Timeout:
            raise pr.ApiError(504, f"no output within the server's timeout of {timeout_s:g} s "
                              "(--timeout_s)", type="timeout_error", code="timeout") from None
        except _Disconnected:
            raise pr.ApiError(499, "the client closed the connection") from None
        finally:
            watcher.cancel()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str | None = None, finish: str | None = None, **kw) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                return _sse(pr.chat_chunk(rid, model_name, created_at, delta=delta,
                                          finish=finish, **kw))
            return _sse(pr.completion_chunk(rid, model_name, created_at, text=text or "",
                                            finish=finish, **kw))

        async def events() -> AsyncIterator[str]:
            finish = None
            try:
                if chat:
                    yield _sse(pr.chat_chunk(rid, model_name, created_at,
                                             delta={"role": "assistant", "content": ""}))
                piece, finish = first
                if piece:
                    yield chunk(piece)
                if finish is None:
                    try:
                        async for piece, finish in pieces:
                            if piece:
                                yield chunk(piece)
                    except _Timeout:
                        finish = "length"
                        yield _sse(pr.error_body(
                            f"the request hit the server's timeout of {timeout_s:g} s "
                            "(--timeout_s)", type="timeout_error", code="timeout"))
                    except pr.ApiError as e:
                        finish = "error"
                        yield _sse(e.body())
                if finish != "error":
                    use = None if include_usage else gen.usage()
                    yield chunk(None, finish or "length", use=use)
                if include_usage:
                    yield chunk(None, None, use=gen.usage(), empty=True)
                yield "data: [DONE]\n\n"
            finally:
                await pieces.aclose()
                request.state.usage = (gen.prompt_tokens, gen.completion_tokens)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _watch_disconnect(request: Request, handle: Any, every_s: float = 0.5) -> None:
    """Cancels a request whose client has gone while no response has started (a running stream
    notices by itself: its next write fails)."""
    while not handle.done:
        await asyncio.sleep(every_s)
        if await request.is_disconnected():
            handle.cancel()
            handle.queue.put_nowait(Finish("cancelled"))
            return


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _max_tokens(prompt_tokens: int, requested: int | None, *, context: int, cap: int,
                param: str) -> int:
    """The request's max_tokens, or a 400 naming the limit it breaks."""
    if prompt_tokens >= context:
        raise pr.ApiError(400, f"this model's maximum context length is {context} tokens "
                          f"(prompt + max_tokens); the {param} has {prompt_tokens} tokens, at most "
                          f"{context - 1} fit", param=param, code="context_length_exceeded")
    if requested is None:
        return min(cap, context - prompt_tokens)
    if requested > cap:
        raise pr.ApiError(400, f"max_tokens={requested} exceeds this server's limit of {cap} "
                          "(--max_new_tokens)", param="max_tokens")
    if prompt_tokens + requested > context:
        raise pr.ApiError(400, f"this model's maximum context length is {context} tokens; the "
                          f"request needs {prompt_tokens + requested} ({prompt_tokens} in the "
                          f"{param}, max_tokens={requested}): shorten the {param} or lower "
                          "max_tokens", param="max_tokens", code="context_length_exceeded")
    return requested


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise pr.ApiError(404, f"the model {requested!r} does not exist: this server serves "
                          f"{served!r}", param="model", code="model_not_found")


def _describe(err: dict) -> str:
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {where!r}"
    return f"{where}: {err.get('msg', 'invalid')}"


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, tokens, latency), written
    when the response (a stream included) has ended."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = scope["zhchat.arrival"] = time.monotonic()
        scope.setdefault("state", {})
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            prompt, completion = scope["state"].get("usage", (0, 0))
            log.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.1f ms", scope["method"],
                     scope["path"], status[0], prompt, completion,
                     1000 * (time.monotonic() - start))
