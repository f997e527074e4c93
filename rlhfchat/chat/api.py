"""OpenAI-compatible HTTP API over the chat engines (FastAPI); `rlhfchat serve` mounts the web page beside it.

    POST /v1/chat/completions   {"model", "messages", "stream"?, "temperature"?, "top_p"?, "max_tokens"?, "seed"?,
                                 "stop"?, "stream_options"?, and the extensions "top_k", "repetition_penalty"}
    GET  /v1/models
    GET  /health                (no key needed)

The official `openai` client works unchanged: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.
Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, and `param` names the field:
400 for an invalid request (including a prompt the model cannot take: the API never drops turns or truncates),
401 for a missing or wrong key, 404 for an unknown model, 429 when the engine's queue is full (with Retry-After).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rlhfchat.chat.engine import EngineBusy, PromptTooLong, SamplingParams
from rlhfchat.errors import RlhfchatError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "name" and other per-message fields are accepted and unused
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The request fields we honour; any other field is a 400 that names it (nothing is silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None


def _param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in ("str", "int", "float", "bool") and "[" not in part \
                and not part.startswith("function-"):  # skip pydantic's union-member tags
            out += f".{part}" if out else part
    return out or None


def _field_of(message: str) -> str | None:
    """The field an RlhfchatError names ("messages[2].role: ..." -> "messages[2].role")."""
    m = re.match(r"([A-Za-z_][\w\[\].]*): ", message)
    return m.group(1) if m else None


def create_app(engines: dict[str, Any], *, api_key: str | None = None, title: str = "rlhfchat") -> FastAPI:
    """The FastAPI app with the OpenAI routes for `engines` (name -> ChatEngine/VLLMEngine)."""
    app = FastAPI(title=title, docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None)
    app.state.engines = engines

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON ({err.get('msg')})").response()
        param = _param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown or unsupported field"
        if param is None:
            msg = f"the body must be a JSON object (Content-Type: application/json): {msg}"
        return ApiError(400, f"{param}: {msg}" if param else msg, param).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error ({type(e).__name__})", type="server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {name: e.load() for name, e in engines.items()}}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rlhfchat",
             "context_window": e.context_window, "backend": e.backend} for name, e in engines.items()]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest) -> Any:
        engine = engines.get(body.model)
        if engine is None:
            raise ApiError(404, f"model: {body.model!r} is not served here; models: {', '.join(engines)}", "model",
                           code="model_not_found")
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        try:
            params = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                max_new_tokens=body.max_completion_tokens or body.max_tokens,
                repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stop)
            req = engine.submit(messages, params, truncate=False)
        except EngineBusy as e:
            raise ApiError(429, str(e), None, "rate_limit_error", "busy", {"Retry-After": "1"}) from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), "messages", code="context_length_exceeded") from None
        except RlhfchatError as e:
            raise ApiError(400, str(e), _field_of(str(e))) from None

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                async for _ in req:
                    pass
            except RlhfchatError as e:
                raise ApiError(500, str(e), type="server_error") from None
            c = req.completion
            return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": None, "finish_reason": _finish(c.finish_reason)}],
                    "usage": _usage(c)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                   "model": body.model, "system_fingerprint": None,
                                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in req:
                    yield chunk({"content": piece})
            except RlhfchatError as e:  # the status line is sent already: the error goes in the stream
                err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            c = req.completion
            yield chunk({}, _finish(c.finish_reason))
            if include_usage:
                usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                         "choices": [], "usage": _usage(c)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(c: Any) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}
