"""OpenAI-compatible request and response bodies (field names as in OpenAI's API reference).

Requests are pydantic models that forbid unknown fields (a typo is an error, not silently
ignored). OpenAI fields this server does not implement are accepted only at their neutral value
(`n=1`, `logprobs` off, penalties 0, `echo` off, ...); anything else is a 400 naming the field.
Extensions: `top_k` (0 = off) and `ignore_eos` (decode exactly max_tokens, for benchmarks).
Responses are plain dicts built by the helpers below.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error returned as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops

    def check_supported(self) -> None:
        """400 for OpenAI features this server does not implement."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: this server returns one choice "
                           "(n=1)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        self.stop_list()


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) \
                and len(self.prompt) != 1:
            raise ApiError(400, f"{len(self.prompt)} prompts in one request: send one prompt "
                           "per request (they are batched on the server)", param="prompt")
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported (only 1)", param="best_of")

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, obj: str, model: str, created: int, choices: list) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": finish, "logprobs": None}
    return {**_envelope(rid, "chat.completion", model, int(time.time()), [choice]), "usage": use}


def chat_chunk(rid: str, model: str, created: int, *, delta: dict | None = None,
               finish: str | None = None, use: dict | None = None,
               empty: bool = False) -> dict[str, Any]:
    choices = [] if empty else [{"index": 0, "delta": delta or {}, "finish_reason": finish,
                                 "logprobs": None}]
    out = _envelope(rid, "chat.completion.chunk", model, created, choices)
    return {**out, "usage": use} if use is not None else out


def completion_response(rid: str, model: str, text: str, finish: str, use: dict
                        ) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {**_envelope(rid, "text_completion", model, int(time.time()), [choice]), "usage": use}


def completion_chunk(rid: str, model: str, created: int, *, text: str = "",
                     finish: str | None = None, use: dict | None = None,
                     empty: bool = False) -> dict[str, Any]:
    choices = [] if empty else [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}]
    out = _envelope(rid, "text_completion", model, created, choices)
    return {**out, "usage": use} if use is not None else out


def models_response(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "zhchat"}]}
