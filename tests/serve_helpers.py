"""A real `fastgpt serve` app on 127.0.0.1 and a random free port, run by uvicorn in a thread.

The server is the same app the CLI runs; only the process differs (a thread here, so
the tiny model is not reloaded and torch not re-imported for every test file).
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from conftest import varied_tiny_model

from fastgpt.finetune.templates import get_template
from fastgpt.model import GPT
from fastgpt.serve.app import LOOPBACK_HOSTS, ServedModel, ServerOptions, create_app, wait_until_ready
from fastgpt.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONTEXT = 256  # room for an Alpaca prompt (its preamble alone is ~30 tokens)


def varied_model(context: int = CONTEXT) -> GPT:
    """conftest's varied tiny model (std 0.2 matrices, so greedy text is not one repeated
    token) with a longer context."""
    return varied_tiny_model(context_length=context)


def served_tiny(model, template: str | None = "alpaca", name: str = "tiny") -> ServedModel:
    return ServedModel(model, Tokenizer(), get_template(template) if template else None, name)


@dataclass
class Running:
    url: str      # http://127.0.0.1:PORT
    app: object   # the FastAPI app (its engine: app.state.fastgpt.engine)

    @property
    def engine(self):
        return self.app.state.fastgpt.engine


@contextmanager
def running_server(served: ServedModel | None = None, load=None, **options):
    """Yield a `Running` server; stop it afterwards."""
    port = free_port()
    options.setdefault("allowed_hosts", LOOPBACK_HOSTS)  # as `fastgpt serve` on 127.0.0.1
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
        yield Running(url, app)
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
