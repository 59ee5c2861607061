"""A real `fastgpt serve` app on 127.0.0.1 and a random free port, run by uvicorn in a thread.

The server is the same app the CLI runs; only the process differs (a thread here, so
the tiny model is not reloaded and torch not re-imported for every test file).
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from fastgpt.finetune.templates import get_template
from fastgpt.serve.app import ServedModel, ServerOptions, create_app, wait_until_ready
from fastgpt.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_tiny(model, template: str | None = "alpaca", name: str = "tiny") -> ServedModel:
    return ServedModel(model, Tokenizer(), get_template(template) if template else None, name)


@contextmanager
def running_server(served: ServedModel | None = None, load=None, **options):
    """Yield the base URL (http://127.0.0.1:PORT) of a started server; stop it afterwards."""
    port = free_port()
    app = create_app(load or (lambda: served), ServerOptions(**options))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        if load is None:
            assert wait_until_ready(app, timeout=30)
        server.app_object = app
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def wait_idle(url: str, timeout: float = 20.0, headers=None) -> dict:
    """Poll /health until no sequence decodes or waits (slots freed); return the last health body."""
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{url}/health", headers=headers).json()
        if body.get("active") == 0 and body.get("waiting") == 0:
            return body
        if time.monotonic() > deadline:
            return body
        time.sleep(0.05)
