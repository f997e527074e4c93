"""`rlhfchat serve MODEL [MODEL ...]`: one server with the OpenAI-compatible API, the web chat page and, for two or
more models, the arena and its leaderboard; every reply, thumb and vote goes to the feedback store.

    rlhfchat serve runs/tiny/ppo runs/tiny/sft --port 8000
    # web page: http://127.0.0.1:8000/    API: http://127.0.0.1:8000/v1    feedback: runs/tiny/feedback.db
    rlhfchat serve --rounds runs/tiny                 # the latest round of `rlhfchat iterate` beside the one before
    rlhfchat serve --name mine=runs/tiny/ppo Qwen/Qwen2.5-0.5B-Instruct --notice "Chats are stored."

A MODEL is a model folder (or LoRA adapter folder) or a Hugging Face Hub id (models.resolve_model: the cached copy
when the hub cannot be reached, else one line saying so; a weight delta is refused). Each is served under its folder's
name (parent folders added while two names clash), or the NAME of `--name NAME=PATH`.

An API key (--api-key, or the RLHFCHAT_API_KEY environment variable) is required when --host is not a loopback
address; with a key, API calls need `Authorization: Bearer KEY` and the web page asks for it as its password.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any

from rlhfchat.errors import RlhfchatError
from rlhfchat.manifest import require_complete

API_KEY_ENV = "RLHFCHAT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dirs", nargs="*", metavar="MODEL",
                        help="model folders (Hugging Face causal LMs or LoRA adapters) or hub ids; two or more models "
                             "enable the arena")
    parser.add_argument("--name", action="append", default=[], metavar="NAME=PATH", type=_named,
                        help="serve the model at PATH (a folder or hub id) under NAME in the API and on the page; "
                             "repeatable; a PATH also given as MODEL is served once, under NAME")
    parser.add_argument("--rounds", metavar="RUN_DIR", default=None,
                        help="serve the latest round of `rlhfchat iterate` in RUN_DIR beside the round before it "
                             "(named round-K and round-(K-1), or sft before round 2), for the arena; feedback goes "
                             "to RUN_DIR/feedback.db, where iterate reads it, unless --db says otherwise")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--db", default=None,
                        help="feedback database: a SQLAlchemy URL (postgresql://...) or a SQLite file path "
                             "(default: feedback.db in the run folder of the first model, else in the current folder)")
    parser.add_argument("--notice", default=None, metavar="TEXT",
                        help="a notice shown at the top of the web page, e.g. \"Conversations, ratings and votes here "
                             "are stored and used to train the next model.\" (default: none)")
    parser.add_argument("--api-key", default=None,
                        help=f"key the API and web page require (default: ${API_KEY_ENV}); required unless --host "
                             "is a loopback address")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting per model before the API answers 429 busy (default 64)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=None,
                        help="largest request body the server reads; larger ones get 413 before they are read "
                             "(default: 1 MiB plus 64 bytes per token of the largest context window served)")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                        help="generation backend (auto: vLLM when installed and a GPU is present, else HF)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _named(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if len(name) > 200 or any(c.isspace() or not c.isprintable() for c in name):
        raise argparse.ArgumentTypeError(f"NAME: expected up to 200 characters without spaces, got {name!r}")
    return name, path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes >= 1, got {text!r}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_names(dirs: list[str | Path]) -> list[str]:
    """Each model's name: its folder name, with parent folders added while two names clash."""
    paths = [Path(d).resolve() for d in dirs]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            return names
        depth += 1


def served_models(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, what the user gave, the option it came from) of every model to serve, from MODEL, --name and
    --rounds, in that order; one-line errors for nothing to serve, a folder twice and a name twice."""
    from rlhfchat import rounds

    given = [str(d) for d in args.model_dirs]
    names = dict(zip(given, model_names(given)))
    out: list[tuple[str, str, str]] = []
    renamed = {}
    for name, path in args.name:
        match = next((g for g in given if g == path or Path(g).resolve() == Path(path).resolve()), None)
        if match is not None:
            renamed[match] = name
        else:
            out.append((name, path, f"--name {name}"))
    out = [(renamed.get(g, names[g]), g, "") for g in given] + out
    if args.rounds:
        out += [(name, str(path), "--rounds") for name, path in rounds.serving(args.rounds)]
    if not out:
        raise RlhfchatError("nothing to serve: give a MODEL (a folder or hub id), --name NAME=PATH or --rounds "
                            "RUN_DIR")
    local = [Path(p).resolve() for _, p, _ in out if Path(p).is_dir()]
    if len(set(local)) != len(local):
        raise RlhfchatError("MODEL: the same folder is given twice")
    seen = [n for n, _, _ in out]
    twice = next((n for n in seen if seen.count(n) > 1), None)
    if twice is not None:
        raise RlhfchatError(f"--name: {twice!r} names two models; give one of them another NAME")
    return out


def build_app(engines: dict[str, Any], store: Any, api_key: str | None = None,
              max_body_bytes: int | None = None, notice: str | None = None) -> Any:
    """The FastAPI app with the API routes and the Gradio page mounted at /."""
    import gradio as gr

    from rlhfchat.chat.api import create_app
    from rlhfchat.chat.web import CSS, build_ui

    app = create_app(engines, api_key=api_key, max_body_bytes=max_body_bytes, store=store)
    demo = build_ui(engines, store, notice=notice)

    def key_as_password(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), api_key.encode())

    # the page links to the API's own docs (/v1/docs), not to Gradio's "Use via API"
    return gr.mount_gradio_app(app, demo, path="/", auth=key_as_password if api_key else None, ssr_mode=False,
                               css=CSS, footer_links=["gradio", "settings"],
                               auth_message="Sign in with any user name and the server's API key as password.")


def main(args: argparse.Namespace) -> None:
    from rlhfchat.models import resolve_model

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise RlhfchatError(f"--host {args.host} is reachable from other machines: set --api-key or ${API_KEY_ENV}")
    models = served_models(args)
    sources = []
    for name, given, what in models:
        source = resolve_model(given, what)  # a folder as it is; a hub id, or its cached copy offline
        if Path(source).is_dir():
            require_complete(source)  # a run's stage folder serves only once its stage has finished
        sources.append(source)

    import uvicorn

    from rlhfchat.chat.engine import load_engine, server_threads
    from rlhfchat.chat.feedback import FeedbackStore, default_db

    db = args.db or (Path(args.rounds).resolve() / "feedback.db" if args.rounds else default_db([models[0][1]]))
    store = FeedbackStore(db)
    engines: dict[str, Any] = {}
    try:
        for (name, _, _), source in zip(models, sources):
            engines[name] = load_engine(source, name=name, backend=args.backend, max_batch=args.max_batch,
                                        max_queue=args.max_queue, threads=server_threads())
        app = build_app(engines, store, api_key, args.max_body_bytes, args.notice)
        base = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
        print(f"rlhfchat serve: {', '.join(f'{n} ({e.backend})' for n, e in engines.items())}\n"
              f"  web page  {base}/\n  API       {base}/v1  (OpenAI-compatible; docs {base}/v1/docs)\n"
              f"  feedback  {store.safe_url()}", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        for e in engines.values():
            e.close()
        store.close()
