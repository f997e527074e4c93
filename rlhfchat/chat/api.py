"""OpenAI-compatible HTTP API over the chat engines (FastAPI); `rlhfchat serve` mounts the web page beside it.

    POST /v1/chat/completions   {"model", "messages", "stream"?, "temperature"?, "top_p"?, "max_tokens"?, "seed"?,
                                 "stop"?, "stream_options"?, and the extensions "top_k", "repetition_penalty"}
    GET  /v1/models, /v1/models/{id}
    POST /v1/feedback           {"reply_id", "thumb": "up"|"down", "comment"?, "user"?}, or
                                {"arena": {"reply_a", "reply_b", "winner": "a"|"b"|"tie"|"both_bad"}, "user"?}
    GET  /health                (no key needed)
    GET  /v1/openapi.json, /v1/docs   the spec (api_schema.py), every status and rule in it

The official `openai` client works unchanged: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.
Every chat completion is stored in the feedback store (`rlhfchat serve --db`) as a reply, under its `id`, once it
is complete: that id is what POST /v1/feedback rates (a stream the client leaves early is not stored). Thumbs and
votes land in the same store as the web page's, the terminal's and the Discord bot's, for `rlhfchat iterate`.
Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, and `param` names the field:
400 for an invalid request (including a prompt the model cannot take: the API never drops turns or truncates),
401 for a missing or wrong key, 404 for an unknown model or reply, or a route the API does not have, 413 for a body
over the limit, 429 when the engine's queue is full (with Retry-After), 503 when the model cannot answer (shutting
down, or its generation failed).

What keeps one caller from harming the others, in the order a request meets it:
1. the guard (an ASGI layer in front of every route and the web page): the API key on every /v1 route but the
   spec and docs, before anything else (an unauthenticated caller learns nothing, not even the schema's rules);
   then 404 and 405 for what the API does not route; then the body limit, answered 413 from Content-Length
   before the body is read (or as soon as a chunked body passes it); and a crash in a route is a 500 in the error
   shape that keeps the keep-alive connection usable;
2. parsing, tokenizing and queueing run in a small thread pool, never on the event loop, so /health and every
   stream keep answering while a maximal prompt is processed;
3. the engine checks every setting and seeds the request's generator before it joins a batch (engine.py);
4. a client that goes away cancels its request, streamed or not.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfchat.chat.api_schema import (
    CHAT_RESPONSES, FEEDBACK_RESPONSES, MODEL_RESPONSES, OTHER_QUESTION, SAME_REPLY, ApiError, ArenaFeedback, Health,
    ModelCard, ModelList, field_of, openapi_document, parse_chat_request, parse_feedback_request,
)
from rlhfchat.chat.request import (
    EngineBusy, EngineClosed, GenerationFailed, PromptTooLong, Request as Reply, SamplingParams,
)
from rlhfchat.errors import RlhfchatError

log = logging.getLogger(__name__)

BODY_BASE_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 64
"""The default body limit: 1 MiB plus 64 bytes per token of the largest context served. A prompt that fits a
context is far smaller (English is about 4 bytes a token; a JSON-escaped emoji 12 bytes for one to four tokens), so
the limit only refuses bodies that could never be served, before they are read, parsed or tokenized."""
API_WORKERS = 4
"""Threads that parse and tokenize requests: enough to keep a CPU busy, few enough to bound the memory of many
large prompts at once (tokenizing one of a million tokens peaks at about 280 MB). A prompt certainly too long for
the context is refused before the tokenizer sees it (engine.chars_per_token_bound)."""
PUBLIC = {"/v1/openapi.json", "/v1/docs", "/v1/docs/oauth2-redirect"}
ROUTES = {"/v1/chat/completions": ["POST"], "/v1/models": ["GET"], "/v1/feedback": ["POST"], "/health": ["GET"]}
"""Each route and its methods (and HEAD with GET): the guard answers any other method with a 405 naming them, and
any other /v1 path with a 404 in OpenAI's error shape (else the web page, mounted at /, would answer for them)."""
PREFIX_ROUTES = {"/v1/models/": ["GET"]}
"""Routes with a path parameter: every path under the prefix (a model's name may hold a slash)."""


def route_methods(path: str) -> list[str] | None:
    """The methods the API answers at `path`; None for a path it does not route."""
    if path in ROUTES:
        return ROUTES[path]
    return next((methods for prefix, methods in PREFIX_ROUTES.items() if path.startswith(prefix)), None)


def default_max_body(engines: dict[str, Any]) -> int:
    """The request-body limit (bytes) when the operator sets none, from the largest context window served."""
    return BODY_BASE_BYTES + BODY_BYTES_PER_TOKEN * max((e.context_window for e in engines.values()), default=0)


def is_protected(path: str) -> bool:
    """The paths the API key guards: every /v1 path but the spec and its docs page."""
    return (path == "/v1" or path.startswith("/v1/")) and path not in PUBLIC


def key_matches(headers: Headers, api_key: str) -> bool:
    header = headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return bool(given) and secrets.compare_digest(given.encode(), api_key.encode())


class _BodyTooLarge(Exception):
    pass


class Guard:
    """The ASGI layer in front of every route (see the module docstring, step 1)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def too_large(self) -> Response:
        return ApiError(413, f"the request body is over this server's limit of {self.max_body} bytes "
                             "(rlhfchat serve --max-body-bytes)", None, code="request_too_large",
                        headers={"Connection": "close"}).response()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and is_protected(scope["path"]) and not key_matches(headers, self.api_key):
            error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                             "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        path, method = scope["path"], scope["method"]
        methods = route_methods(path)
        if methods is not None and method not in (*methods, *(["HEAD"] if "GET" in methods else [])):
            allowed = ", ".join(methods)
            return await ApiError(405, f"{method} is not allowed here; use {allowed}", None, code="method_not_allowed",
                                  headers={"Allow": allowed}).response()(scope, receive, send)
        if is_protected(path) and methods is None:
            routes = ", ".join(p for p in [*ROUTES, *(f"{p}{{id}}" for p in PREFIX_ROUTES)] if is_protected(p))
            return await ApiError(404, f"{method} {path}: no such API route; this server has {routes}", None,
                                  code="not_found").response()(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self.too_large()(scope, receive, send)
        seen, started = 0, False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body, or one longer than its Content-Length said
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self.too_large()(scope, receive, send)
        except Exception:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            # answered here rather than by Starlette's error handler, which re-raises, and then uvicorn drops the
            # keep-alive connection and the client's next request with it
            await ApiError(500, "internal error (the server's log has the traceback)", type="server_error",
                           code="internal_error").response()(scope, receive, send)


def create_app(engines: dict[str, Any], *, api_key: str | None = None, title: str = "rlhfchat",
               max_body_bytes: int | None = None, store: Any = None) -> FastAPI:
    """The FastAPI app with the OpenAI routes for `engines` (name -> ChatEngine/VLLMEngine); replies, thumbs and
    votes go to `store` (a FeedbackStore; None: nothing is stored, and /v1/feedback answers 503)."""
    app = FastAPI(title=title, docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None,
                  description="OpenAI-compatible chat API of rlhfchat. Every error is `{\"error\": {\"message\", "
                              "\"type\", \"param\", \"code\"}}`; `param` names the field at fault.")
    app.state.engines = engines
    app.state.max_body_bytes = max_body_bytes or default_max_body(engines)
    app.add_middleware(Guard, api_key=api_key, max_body=app.state.max_body_bytes)
    pool = ThreadPoolExecutor(max_workers=API_WORKERS, thread_name_prefix="api")

    async def offload(fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kw))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                        headers=e.headers).response()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            paths = {getattr(r, "path_format", getattr(r, "path", "")) for r in app.routes}
            protected = {path for path in paths if is_protected(path)}
            app.openapi_schema = openapi_document(app, protected, api_key is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {name: e.load() for name, e in engines.items()}}

    def card(name: str) -> dict[str, Any]:
        e = engines[name]
        return {"id": name, "object": "model", "created": 0, "owned_by": "rlhfchat",
                "context_window": e.context_window, "backend": e.backend}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(name) for name in engines]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=MODEL_RESPONSES)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in engines:
            raise ApiError(404, f"model: {model_id!r} is not served here; models: {', '.join(engines)}", "model",
                           code="model_not_found")
        return card(model_id)

    @app.post("/v1/feedback", responses=FEEDBACK_RESPONSES)  # the request body: api_schema.openapi_document
    async def feedback(request: Request) -> Any:
        body = await offload(parse_feedback_request, await request.body())
        if store is None:
            raise ApiError(503, "this server keeps no feedback store", None, "server_error", "unavailable")
        return await offload(record_feedback, store, body)

    def keep(completion: Any, reply_id: str, user: str | None) -> None:
        """Store a finished reply under its completion id (a worker thread: the store's SQL blocks). A store that
        fails is logged, and the caller still gets the reply."""
        if store is None:
            return
        try:
            conv = store.new_conversation("api", client=user[:200] if user else None)
            store.add_reply(conv, completion, reply_id=reply_id)
        except Exception:  # noqa: BLE001 - the database's trouble, not the caller's
            log.exception("reply %s could not be stored in the feedback store", reply_id)

    @app.post("/v1/chat/completions", responses=CHAT_RESPONSES)  # the request body: api_schema.openapi_document
    async def chat_completions(request: Request) -> Any:
        body = await offload(parse_chat_request, await request.body())
        engine = engines.get(body.model)
        if engine is None:
            raise ApiError(404, f"model: {body.model!r} is not served here; models: {', '.join(engines)}", "model",
                           code="model_not_found")
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        try:
            params = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                max_new_tokens=body.max_completion_tokens or body.max_tokens,
                repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed,
                stop=[body.stop] if isinstance(body.stop, str) else (body.stop or []))
            req = await offload(engine.submit, messages, params, truncate=False)
        except EngineBusy as e:
            raise ApiError(429, str(e), None, "rate_limit_error", "busy", {"Retry-After": "1"}) from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), "messages", code="context_length_exceeded") from None
        except EngineClosed as e:
            raise ApiError(503, str(e), None, "server_error", "unavailable") from None
        except RlhfchatError as e:
            raise ApiError(400, str(e), field_of(str(e))) from None

        cid, created = completion_id(), int(time.time())
        if not body.stream:
            try:
                c = await _reply_unless_gone(req, request)
            except RlhfchatError as e:  # GenerationFailed, or the engine closed under it
                code = "generation_failed" if isinstance(e, GenerationFailed) else "unavailable"
                raise ApiError(503, str(e), None, "server_error", code) from None
            if c is None:
                return Response(status_code=204)  # nobody is there to read it
            await offload(keep, c, cid, body.user)
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
            try:
                yield chunk({"role": "assistant", "content": ""})
                try:
                    async for piece in req:
                        yield chunk({"content": piece})
                except RlhfchatError as e:  # the status line is sent already: the error goes in the stream
                    code = "generation_failed" if isinstance(e, GenerationFailed) else "unavailable"
                    err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                c = req.completion
                await offload(keep, c, cid, body.user)  # before the end, so that the id can be rated once it is seen
                yield chunk({}, _finish(c.finish_reason))
                if include_usage:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                             "choices": [], "usage": _usage(c)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # the client went away (a no-op once the reply is complete)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def completion_id() -> str:
    """A completion's id, which is also its reply's id in the feedback store: "chatcmpl-" and 23 random hex digits
    (92 bits), 32 characters, the store's id width."""
    return f"chatcmpl-{uuid.uuid4().hex[:23]}"


def record_feedback(store: Any, body: Any) -> dict[str, Any]:
    """Store a thumb or an arena vote from POST /v1/feedback; 404 for a reply the store does not have, 400 for a
    vote that compares nothing (see api_schema.FEEDBACK_RULES). Blocking SQL: run in a worker thread."""
    from rlhfchat.chat.feedback import same_question

    def reply(reply_id: str, field: str) -> dict[str, Any]:
        found = store.reply(reply_id)
        if found is None:
            raise ApiError(404, f"{field}: no reply {reply_id!r} in this server's feedback store", field,
                           code="reply_not_found")
        return found

    if isinstance(body, ArenaFeedback):
        v = body.arena
        a, b = reply(v.reply_a, "arena.reply_a"), reply(v.reply_b, "arena.reply_b")
        if v.reply_a == v.reply_b:
            raise ApiError(400, f"arena.reply_b: {SAME_REPLY}", "arena.reply_b")
        if not same_question(a["prompt"], b["prompt"]):
            raise ApiError(400, f"arena.reply_b: {OTHER_QUESTION}", "arena.reply_b")
        vote = store.arena_vote(v.reply_a, v.reply_b, v.winner, user=body.user)
        return {"object": "feedback.arena", "id": vote, "reply_a": v.reply_a, "reply_b": v.reply_b,
                "model_a": a["model"], "model_b": b["model"], "winner": v.winner}
    r = reply(body.reply_id, "reply_id")
    thumb = store.thumb(body.reply_id, body.thumb == "up", user=body.user, comment=body.comment)
    return {"object": "feedback.thumb", "id": thumb, "reply_id": body.reply_id, "model": r["model"],
            "thumb": body.thumb, "comment": body.comment}


async def _reply_unless_gone(req: Reply, request: Request) -> Any:
    """Wait for a whole (non-streamed) reply; None when the client disconnects first, and then the request is
    cancelled, as a stream's is. Once the body is read, the next ASGI message is http.disconnect."""

    async def drain() -> Any:
        async for _ in req:
            pass
        return req.completion

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    done: set[Any] = set()
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if work not in done:
            req.cancel()
            work.cancel()
    return work.result() if work in done else None


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(c: Any) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}
