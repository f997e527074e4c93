"""Hooks for the schemathesis run of tests/test_chat_faults.py, loaded through SCHEMATHESIS_HOOKS.

1. Requests name the served model (RLHFCHAT_FUZZ_MODEL): the public spec does not list the models (GET /v1/models,
   behind the key, does), so a generated name would only ever reach the 404 and never the engine.
2. `documented_rejection` replaces schemathesis' positive_data_acceptance with an exact version: a request the
   schema calls valid is accepted, or refused with a 400 for one of the rules the spec's descriptions state and
   JSON Schema cannot (the last message must be the user's; the prompt must fit the context window).
"""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ["RLHFCHAT_FUZZ_MODEL"]
RULES = ("the last message must be the user's",)


@schemathesis.hook
def before_call(context, case, kwargs) -> None:  # noqa: ANN001 - schemathesis' hook signature
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL


@schemathesis.check
def documented_rejection(ctx, response, case) -> bool | None:  # noqa: ANN001
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    if case.path != "/v1/chat/completions":
        raise AssertionError(f"a valid request to {case.path} got 400: {response.text}")
    error = response.json()["error"]
    if error.get("code") == "context_length_exceeded" or error["message"].endswith(RULES):
        return None
    raise AssertionError(f"a request valid by the schema got a 400 that no documented rule explains: "
                         f"{error['message']}")
