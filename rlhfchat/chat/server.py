"""`rlhfchat serve MODEL_DIR [MODEL_DIR ...]`: one server with the OpenAI-compatible API, the web chat page and,
for two or more models, the arena; every reply, thumb and vote goes to the feedback store.

    rlhfchat serve runs/tiny/ppo runs/tiny/sft --port 8000
    # web page: http://127.0.0.1:8000/    API: http://127.0.0.1:8000/v1    feedback: runs/tiny/feedback.db

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
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="Hugging Face causal-LM folders (or LoRA adapter folders); two or more enable the arena")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--db", default=None,
                        help="feedback database: a SQLAlchemy URL (postgresql://...) or a SQLite file path "
                             "(default: feedback.db in the run folder of the first model, else in the current folder)")
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


def build_app(engines: dict[str, Any], store: Any, api_key: str | None = None,
              max_body_bytes: int | None = None) -> Any:
    """The FastAPI app with the API routes and the Gradio page mounted at /."""
    import gradio as gr

    from rlhfchat.chat.api import create_app
    from rlhfchat.chat.web import CSS, build_ui

    app = create_app(engines, api_key=api_key, max_body_bytes=max_body_bytes)
    demo = build_ui(engines, store)

    def key_as_password(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), api_key.encode())

    return gr.mount_gradio_app(app, demo, path="/", auth=key_as_password if api_key else None, ssr_mode=False, css=CSS, footer_links=["api"],
                               auth_message="Sign in with any user name and the server's API key as password.")


def main(args: argparse.Namespace) -> None:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise RlhfchatError(f"--host {args.host} is reachable from other machines: set --api-key or ${API_KEY_ENV}")
    if len({Path(d).resolve() for d in args.model_dirs}) != len(args.model_dirs):
        raise RlhfchatError("MODEL_DIR: the same folder is given twice")
    for d in args.model_dirs:
        if not Path(d).is_dir():
            raise RlhfchatError(f"{d}: no such model folder")
        require_complete(d)  # a run's stage folder serves only once its stage has finished

    import uvicorn

    from rlhfchat.chat.engine import load_engine, server_threads
    from rlhfchat.chat.feedback import FeedbackStore, default_db

    store = FeedbackStore(args.db or default_db(args.model_dirs))
    engines: dict[str, Any] = {}
    try:
        for name, d in zip(model_names(args.model_dirs), args.model_dirs):
            engines[name] = load_engine(d, name=name, backend=args.backend, max_batch=args.max_batch,
                                        max_queue=args.max_queue, threads=server_threads())
        app = build_app(engines, store, api_key, args.max_body_bytes)
        base = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
        print(f"rlhfchat serve: {', '.join(f'{n} ({e.backend})' for n, e in engines.items())}\n"
              f"  web page  {base}/\n  API       {base}/v1  (OpenAI-compatible)\n"
              f"  feedback  {store.safe_url()}", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        for e in engines.values():
            e.close()
        store.close()
