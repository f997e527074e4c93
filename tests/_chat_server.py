"""Start `rlhfchat serve` as a real process on a free local port, for the API and web tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx


def long_context_copy(model_dir: Path, dest: Path, positions: int = 4096) -> Path:
    """The same tiny model with a longer context window, so that a greedy reply (which never meets EOS on these
    random weights) runs for seconds: bystanders that are still decoding, a request left to be cancelled."""
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["max_position_embeddings"] = positions
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dirs: list[Path], workdir: Path, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 180) -> Iterator[str]:
    """Yields the base URL once /health answers; stops the server at the end (its log is in workdir)."""
    port = free_port()
    log = open(workdir / "server.log", "w")
    cmd = [sys.executable, "-m", "rlhfchat.cli", "serve", *map(str, model_dirs), "--port", str(port),
           "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{(workdir / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not up after {timeout}s:\n{(workdir / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
