"""Hooks for the schemathesis run of tests/test_chat_faults.py, loaded through SCHEMATHESIS_HOOKS.

1. Requests name the served model (RLHFCHAT_FUZZ_MODEL): the public spec does not list the models (GET /v1/models,
   behind the key, does), so a generated name would only ever reach the 404 and never the engine. So do valid
   requests for one model (GET /v1/models/{model_id}).
2. Valid feedback names two real replies to the same question (RLHFCHAT_FUZZ_REPLIES, made by the test), so that
   it is stored and its answer checked against the schema, instead of always reaching the 404 of an unknown id.
3. `documented_rejection` replaces schemathesis' positive_data_acceptance with an exact version: a request the
   schema calls valid is accepted, or refused with a 400 for one of the rules the spec's descriptions state and
   JSON Schema cannot (the last message must be the user's; the prompt must fit the context window; a vote needs
   two replies to the same question).
"""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ["RLHFCHAT_FUZZ_MODEL"]
REPLIES = os.environ["RLHFCHAT_FUZZ_REPLIES"].split(",")
RULES = ("the last message must be the user's",)
FEEDBACK_RULES = ("the same reply twice", "a reply to another question")


def _positive(case) -> bool:  # noqa: ANN001
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def before_call(context, case, kwargs) -> None:  # noqa: ANN001 - schemathesis' hook signature
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    if not _positive(case):  # an invalid request stays as it was made
        return
    if case.path == "/v1/models/{model_id}":
        case.path_parameters["model_id"] = MODEL
    if case.path == "/v1/feedback" and isinstance(case.body, dict):
        if "reply_id" in case.body:
            case.body["reply_id"] = REPLIES[0]
        if isinstance(case.body.get("arena"), dict):
            case.body["arena"].update(reply_a=REPLIES[0], reply_b=REPLIES[1])


@schemathesis.check
def documented_rejection(ctx, response, case) -> bool | None:  # noqa: ANN001
    if not _positive(case) or response.status_code != 400:
        return None
    error = response.json()["error"]
    if case.path == "/v1/feedback" and error["message"].endswith(FEEDBACK_RULES):
        return None
    if case.path != "/v1/chat/completions":
        raise AssertionError(f"a valid request to {case.path} got 400: {response.text}")
    if error.get("code") == "context_length_exceeded" or error["message"].endswith(RULES):
        return None
    raise AssertionError(f"a request valid by the schema got a 400 that no documented rule explains: "
                         f"{error['message']}")
