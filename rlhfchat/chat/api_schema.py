"""What the OpenAI-compatible API takes and answers, written once: the request model (parsed strictly, so that
what the spec calls invalid is refused), the response and error shapes, and the OpenAPI document built from them,
with every status the API returns and the rules JSON Schema cannot state written beside the fields they concern.

The spec is served at /v1/openapi.json; the suite runs schemathesis against it on a live server
(tests/test_chat_faults.py) with its conformance checks on.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema, model_validator,
)

from rlhfchat.chat.request import REPETITION_PENALTY_RANGE, SEED_RANGE, check_text
from rlhfchat.errors import RlhfchatError


class ApiError(Exception):
    """An answer in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return _AsciiJSON(body, status_code=self.status, headers=self.headers)


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote a caller's text, lone surrogates included, and must still
    encode (Starlette's own JSONResponse raises on them and the connection is dropped)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------- the request

def _only(kind: type, value: Any, json_type: str) -> Any:
    """A field that takes exactly one JSON value (pydantic's Literal[False] also takes 0, Literal[1] takes true)."""

    def check(x: Any) -> Any:
        if x != value:
            raise ValueError(f"only {json.dumps(value)} is supported")
        return x

    return Annotated[kind, AfterValidator(check), WithJsonSchema({"type": json_type, "const": value})]


StopText = Annotated[str, StringConstraints(min_length=1)]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "name" and other per-message fields: accepted, unused
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The request fields we honour; any other field is a 400 that names it (nothing is silently ignored).
    Strict: a string is not a number here, nor true a 1, as the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(description="A model this server serves (GET /v1/models lists them); any other name: 404.")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="rlhfchat extension: keep the k most likely tokens (0: all).")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=10,
                                             description="rlhfchat extension: > 1 discourages repeating tokens.")
    presence_penalty: _only(float, 0, "number") | None = None
    frequency_penalty: _only(float, 0, "number") | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    n: _only(int, 1, "integer") | None = None
    logprobs: _only(bool, False, "boolean") | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _integral(cls, data: Any) -> Any:
        """5.0 is an integer to JSON Schema (and to schemathesis); strict pydantic takes only 5."""
        if isinstance(data, dict):
            for name in INTEGER_FIELDS:
                x = data.get(name)
                if isinstance(x, float) and x.is_integer():
                    data = {**data, name: int(x)}
        return data


INTEGER_FIELDS = ("top_k", "max_tokens", "max_completion_tokens", "seed", "n")


MESSAGES_RULES = (
    "The conversation: an optional system (or developer) message first, then user and assistant messages; the last "
    "message must be the user's (else 400 naming that message's role). All of it, plus max_tokens when given, must "
    "fit the model's context window: the API never drops turns (else 400, code context_length_exceeded). Text must "
    "be valid Unicode: a lone surrogate such as \\ud800 is a 400 naming the message.")

_UNION_TAGS = {"str", "int", "float", "bool", "constrained-str", "list", "dict", "none"}


def _param(loc: tuple[Any, ...], extra: bool = False) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; pydantic's union-member tags are left out."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (extra and i == len(loc) - 1 or (
                part not in _UNION_TAGS and "[" not in part and not part.startswith("function-"))):
            out += f".{part}" if out else part
    return out or None


def field_of(message: str) -> str | None:
    """The field an RlhfchatError names ("messages[2].role: ..." -> "messages[2].role")."""
    m = re.match(r"([A-Za-z_][\w\[\].]*): ", message)
    return m.group(1) if m else None


def _reject_constant(name: str) -> None:
    raise ApiError(400, f"the body is not valid JSON ({name} is not a JSON number)")


def _check_unicode(obj: Any) -> None:
    """A 400 naming the first string (or field name) with a lone surrogate, which JSON escapes can carry."""
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        where, x = todo.pop()
        if isinstance(x, str):
            check_text(where or "the body", x)
        elif isinstance(x, list):
            todo.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(x)]))
        elif isinstance(x, dict):
            items = []
            for k, v in x.items():
                check_text(f"{where}.{ascii(k)}" if where else ascii(k), k)
                items.append((f"{where}.{k}" if where else k, v))
            todo.extend(reversed(items))


def _json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or an ApiError 400 saying what is wrong with it (a lone surrogate: the
    400 names the field that holds it)."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON (not UTF-8 at byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON for this API (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and integers over Python's 4300-digit limit
        raise ApiError(400, f"the body is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json)")
    if re.search(rb"\\u[dD][89a-fA-F]", raw):  # only a \uD8xx-\uDFxx escape can make a lone surrogate
        try:
            _check_unicode(obj)
        except RlhfchatError as e:
            raise ApiError(400, str(e), field_of(str(e))) from None
    return obj


def _validate(model: type[BaseModel], obj: dict[str, Any]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        extra = err.get("type") == "extra_forbidden"
        param = _param(tuple(err.get("loc", ())), extra)
        msg = "unknown or unsupported field" if extra else err.get("msg", "invalid value")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request from its JSON body, or an ApiError 400 that names the field. CPU work: the routes run it in
    a worker thread, never on the event loop."""
    return _validate(ChatRequest, _json_object(raw))


# ---------------------------------------------------------------- feedback

ReplyId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
RaterId = Annotated[str, StringConstraints(max_length=200)]
REPLY_ID = ("The `id` of a chat completion this server gave (every completion is stored as a reply), or of any "
            "reply in its feedback store.")
USER = ("Who rates (your end-user's id, as OpenAI's `user`): each user's latest thumb on a reply counts; without it "
        "the thumbs of all callers are one user's.")


class ThumbFeedback(BaseModel):
    """A thumb up or down on one reply."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reply_id: ReplyId = Field(description=REPLY_ID)
    thumb: Literal["up", "down"]
    comment: Annotated[str, StringConstraints(max_length=10_000)] | None = Field(
        None, description="Why, in the rater's words; stored with the thumb.")
    user: RaterId | None = Field(None, description=USER)


class ArenaChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reply_a: ReplyId = Field(description=REPLY_ID)
    reply_b: ReplyId = Field(description="Another reply to the same question (the same system prompt and user "
                                         "messages; earlier assistant turns may differ).")
    winner: Literal["a", "b", "tie", "both_bad"]


class ArenaFeedback(BaseModel):
    """A vote between two replies to the same question (from two models, as in the arena)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    arena: ArenaChoice
    user: RaterId | None = Field(None, description="Who votes (your end-user's id), stored with the vote.")


FEEDBACK_RULES = (
    "A thumb `{\"reply_id\", \"thumb\", \"comment\"?}` or an arena vote `{\"arena\": {\"reply_a\", \"reply_b\", "
    "\"winner\"}}`. A reply id this server does not know is a 404 naming the field (code reply_not_found). An arena "
    "vote needs two different replies (else 400: `the same reply twice`) to the same question: the same system prompt "
    "and user messages (else 400: `a reply to another question`).")
SAME_REPLY = "the same reply twice"
OTHER_QUESTION = "a reply to another question"
FEEDBACK_400_RULES = (SAME_REPLY, OTHER_QUESTION)
"""The 400s of /v1/feedback that JSON Schema cannot state: their messages end with these words."""


def parse_feedback_request(raw: bytes) -> ThumbFeedback | ArenaFeedback:
    """A thumb, or an arena vote (a body with "arena"), from the JSON body; else an ApiError 400 naming the field."""
    obj = _json_object(raw)
    return _validate(ArenaFeedback if "arena" in obj else ThumbFeedback, obj)


# ---------------------------------------------------------------- the answers

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One event of a stream: a piece of the reply; the last one (with stream_options.include_usage) has no
    choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int
    backend: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ThumbResult(BaseModel):
    object: Literal["feedback.thumb"]
    id: int
    reply_id: str
    model: str = Field(description="The model that wrote the reply.")
    thumb: Literal["up", "down"]
    comment: str | None


class ArenaResult(BaseModel):
    object: Literal["feedback.arena"]
    id: int
    reply_a: str
    reply_b: str
    model_a: str
    model_b: str
    winner: Literal["a", "b", "tie", "both_bad"]


class EngineLoad(BaseModel):
    running: int
    waiting: int


class Health(BaseModel):
    status: Literal["ok"]
    models: dict[str, EngineLoad]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


SSE_EVENT = {  # OpenAPI before 3.2: the `schema` of text/event-stream describes one event
    "type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": "#/components/schemas/ChatCompletionChunk"}, {"$ref": "#/components/schemas/ErrorResponse"}]}},
    ]}}}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ChatCompletion, "description": "The reply; with `stream: true`, server-sent events, each a "
          "`chat.completion.chunk`, then `data: [DONE]`; an error after the stream began is an event "
          "`{\"error\": ...}` (and no [DONE]).", "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    400: _error("Invalid request: `param` names the field. Includes the rules JSON Schema cannot state: the last "
                "message must be the user's; the prompt (plus max_tokens) must fit the model's context "
                "(code context_length_exceeded); text must be valid Unicode."),
    404: _error("`model` is not served here (code model_not_found)."),
    429: _error("The model's queue is full (code busy); try again after Retry-After seconds."),
    503: _error("The model cannot answer now: it is shutting down, or generation failed (code generation_failed)."),
}
FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The thumb or vote, as stored.", "content": {"application/json": {"schema": {"oneOf": [
        {"$ref": "#/components/schemas/ThumbResult"}, {"$ref": "#/components/schemas/ArenaResult"}]}}}},
    400: _error("Invalid feedback: `param` names the field; also an arena vote on one reply twice, or on replies "
                "to different questions."),
    404: _error("No reply with this id (code reply_not_found); `param` names the field."),
    503: _error("This server keeps no feedback store."),
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: _error("No such model is served here (code model_not_found)."),
}
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: _error("The request body is over the server's limit (`rlhfchat serve --max-body-bytes`; by default "
                "derived from the largest context window served); sent before the body is read."),
}
UNAUTHORIZED = _error("Missing or wrong API key (send `Authorization: Bearer KEY`); checked before anything else, "
                      "so a caller without the key learns nothing of the request's rules.")


def openapi_document(app: Any, protected: set[str], secured: bool) -> dict[str, Any]:
    """FastAPI's document, completed: the chat request's schema (the route reads its own body, off the event loop),
    the conversation rules, the 401 and security scheme of every protected route, the 413 of every route."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    chat = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(chat.pop("$defs", {}))
    turn = json.loads(json.dumps(schemas["Message"]))
    turn["properties"]["role"] = {"type": "string", "enum": ["user", "assistant"], "title": "Role"}
    turn["title"] = "Turn"
    schemas["Turn"] = turn
    # JSON Schema can say that only the first message may be a system message; "the last one is the user's" it
    # cannot, so that rule is written in the description (and answered with a 400 naming it)
    chat["properties"]["messages"] = {
        "type": "array", "minItems": 1, "title": "Messages", "description": MESSAGES_RULES,
        "prefixItems": [{"$ref": "#/components/schemas/Message"}], "items": {"$ref": "#/components/schemas/Turn"}}
    schemas["ChatRequest"] = chat
    chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(chunk.pop("$defs", {}))
    schemas["ChatCompletionChunk"] = chunk
    post = doc["paths"]["/v1/chat/completions"]["post"]
    post["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatRequest"}}}}
    for model in (ThumbFeedback, ArenaFeedback, ThumbResult, ArenaResult):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    post = doc["paths"]["/v1/feedback"]["post"]
    post["description"] = FEEDBACK_RULES
    post["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        {"$ref": "#/components/schemas/ThumbFeedback"}, {"$ref": "#/components/schemas/ArenaFeedback"}]}}}}
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in doc["paths"].items():
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if secured and path in protected:
                op["security"] = [{"bearer": []}]
                responses["401"] = _inline(UNAUTHORIZED)
            for status, spec in COMMON_RESPONSES.items():
                responses.setdefault(str(status), _inline(spec))
    return doc


def _inline(spec: dict[str, Any]) -> dict[str, Any]:
    return {"description": spec["description"], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
