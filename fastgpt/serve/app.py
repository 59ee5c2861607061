"""The HTTP side of `fastgpt serve`: an OpenAI-compatible FastAPI app over the batching engine.

    GET  /                      the browser chat page (plain HTML + JS)
    GET  /health                200 once the model is loaded, 503 while it loads
    GET  /v1/models             the served model
    POST /v1/completions        text (or token ids) in, continuation out
    POST /v1/chat/completions   messages through the model's template

The model loads in a background thread, so the port answers (503) at once. Every
/v1 route checks `Authorization: Bearer KEY` when an API key is set. A request
body is read up to a size limit. Requests become engine sequences (one per prompt
and choice); their events cross from the engine thread into the event loop through
an asyncio queue. A client that goes away (the stream is cancelled, or a waiting
non-streaming client disconnects) cancels its sequences, which frees their slots at
the next step. Errors have OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import FastGPTError
from ..finetune.templates import Template
from .chat import chat_prompt
from .engine import Engine, Event, QueueFull
from .protocol import (
    COMPLETION_DEFAULT_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    checked_seed,
    choices_per_prompt,
    completion_prompts,
    envelope,
    error_body,
    new_id,
    parse,
    requested_max_tokens,
    sampling_params,
    stop_strings,
    usage,
)

PAGE = Path(__file__).with_name("page.html")
DEFAULT_MAX_BODY_BYTES = 1 << 20   # 1 MiB: far more than any prompt that fits a GPT-2 context
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


@dataclass
class ServedModel:
    """What the server answers with: the model, its tokenizer, its chat template (or None) and its name."""
    model: object
    tokenizer: object
    template: Template | None
    name: str


@dataclass
class ServerOptions:
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Host headers accepted (None: any). A server on the loopback address accepts only loopback
    # names, so a web page cannot reach it through DNS rebinding.
    allowed_hosts: list[str] | None = None


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class _State:
    """Filled in by the loading thread; the routes read it."""

    def __init__(self):
        self.served: ServedModel | None = None
        self.engine: Engine | None = None
        self.error: str | None = None
        self.ready = threading.Event()


def create_app(load: Callable[[], ServedModel], options: ServerOptions | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app; `load` runs in a background thread at start-up (a FastGPTError there goes
    to `on_load_error`, and /health reports it)."""
    options = options or ServerOptions()
    state = _State()

    def load_model() -> None:
        try:
            served = load()
            engine = Engine(served.model, served.tokenizer, options.max_batch, options.max_queue).start()
            state.served, state.engine = served, engine
            state.ready.set()
        except Exception as err:  # reported on /health and to the caller, not lost in a thread
            if not isinstance(err, FastGPTError):
                traceback.print_exc()
            state.error = str(err)
            if on_load_error is not None:
                on_load_error(state.error)

    @asynccontextmanager
    async def lifespan(_app):
        loader = threading.Thread(target=load_model, name="fastgpt-load", daemon=True)
        loader.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="fastgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fastgpt = state
    if options.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=options.allowed_hosts)

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    def ready() -> tuple[ServedModel, Engine]:
        if state.engine is None:
            message = f"the model failed to load: {state.error}" if state.error else "the model is loading"
            raise APIError(503, message, type="server_error", code="model_not_ready",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return state.served, state.engine

    def check_auth(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if state.engine is not None:
            active, waiting = state.engine.load()
            return {"status": "ok", "model": state.served.name, "active": active, "waiting": waiting}
        if state.error:
            return JSONResponse({"status": "error", "message": state.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])

    def model_card(served: ServedModel) -> dict:
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "fastgpt",
                "max_model_len": served.model.config.context_length,
                "chat_template": served.template.name if served.template else None}

    @v1.get("/models")
    async def models():
        served, _ = ready()
        return {"object": "list", "data": [model_card(served)]}

    @v1.get("/models/{model_id}")
    async def one_model(model_id: str):
        served, _ = ready()
        check_model(served, model_id)
        return model_card(served)

    @v1.post("/completions")
    async def completions(request: Request):
        served, engine = ready()
        req = parse(CompletionRequest, await read_body(request, options.max_body_bytes))
        check_model(served, req.model)
        prompts = completion_prompts(req, served.tokenizer, served.model.config.vocab_size)
        run = _Run.start(engine, served, req, prompts, default_max_tokens=COMPLETION_DEFAULT_TOKENS)
        if req.stream:
            return _sse(run.stream_completion(), run.cancel)
        return await run.complete(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        served, engine = ready()
        req = parse(ChatRequest, await read_body(request, options.max_body_bytes))
        check_model(served, req.model)
        prompt, template_stops = chat_prompt(served.template, req.messages)
        prompts = [served.tokenizer.encode(prompt)]
        run = _Run.start(engine, served, req, prompts, default_max_tokens=None, extra_stops=template_stops)
        if req.stream:
            return _sse(run.stream_chat(), run.cancel)
        return await run.complete(request, chat=True)

    app.include_router(v1)
    return app


def check_model(served: ServedModel, name: str | None) -> None:
    if name is not None and name != served.name:
        raise APIError(404, f"model {name!r} is not served here; this server serves {served.name!r}",
                       param="model", code="model_not_found")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (Content-Length or not),
    and with 415 unless it is declared JSON: a page of another site can send a plain-text
    POST here without the browser asking first (CORS), but not a JSON one."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json, got "
                            f"{content_type or 'none'}", code="unsupported_media_type")
    return b"".join(chunks)


def _sse(events: AsyncIterator[dict | str], on_close: Callable[[], None]) -> StreamingResponse:
    """A text/event-stream response; `on_close` runs when it ends, however it ends (also when
    the client left before the first event, when the events' own cleanup never started)."""
    async def lines():
        async for item in events:
            payload = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, separators=(",", ":"))
            yield f"data: {payload}\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream", background=BackgroundTask(on_close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Run:
    """One HTTP request's sequences (prompts x n choices) and the queue their events arrive on."""

    def __init__(self, served: ServedModel, req, prompts: list[list[int]], n: int):
        self.served, self.req, self.prompts, self.n = served, req, prompts, n
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs = []
        self.pending = len(prompts) * n
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    @classmethod
    def start(cls, engine: Engine, served: ServedModel, req, prompts: list[list[int]], *,
              default_max_tokens: int | None, extra_stops: list[str] = ()) -> "_Run":
        params = sampling_params(req)
        seed = checked_seed(req)
        n = choices_per_prompt(req, engine.max_batch)
        stops = stop_strings(req)
        stops += [s for s in extra_stops if s not in stops]
        context = engine.context_length
        max_tokens = requested_max_tokens(req)
        longest = max(map(len, prompts))
        if max_tokens is None:
            if longest >= context:
                raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                                    f"{longest} tokens", param="prompt" if default_max_tokens else "messages",
                               code="context_length_exceeded")
            max_tokens = context - longest if default_max_tokens is None else min(default_max_tokens,
                                                                                 context - longest)
        run = cls(served, req, prompts, n)
        loop = asyncio.get_running_loop()
        entries = [(ids, None if seed is None else seed + j) for ids in prompts for j in range(n)]
        sinks = [run._sink(loop, index) for index in range(len(entries))]
        try:
            run.seqs = engine.submit_many(entries, max_tokens, params, stop=stops, sinks=sinks)
        except QueueFull as err:
            raise APIError(503, f"the server is at capacity ({err}); retry shortly", type="server_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except FastGPTError as err:
            raise APIError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else "prompt",
                           code="context_length_exceeded" if "context length" in str(err) else None) from None
        return run

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def events(self, request: Request | None) -> AsyncIterator[tuple[int, Event]]:
        """Events until every sequence has finished. With `request`, a client that
        disconnects while waiting cancels the run (a stream is cancelled by Starlette)."""
        checked = time.monotonic()
        try:
            while self.pending:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()  # (events may arrive every step: poll by the clock)
                    if await request.is_disconnected():
                        return
                if item is None:
                    continue
                index, event = item
                if event.finish_reason or event.error:
                    self.pending -= 1
                yield index, event
        finally:
            self.cancel()  # a no-op for finished sequences; frees the slots of abandoned ones

    def usage(self, completion_tokens: int) -> dict:
        return usage(sum(map(len, self.prompts)), completion_tokens)

    async def complete(self, request: Request, chat: bool) -> JSONResponse:
        count = len(self.prompts) * self.n
        texts, reasons, completion_tokens = [[] for _ in range(count)], [None] * count, 0
        async for index, event in self.events(request):
            if event.error:
                raise APIError(500, event.error, type="server_error")
            texts[index].append(event.text)
            if event.finish_reason:
                reasons[index] = event.finish_reason
                completion_tokens += event.completion_tokens
        if self.pending:
            return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
        name, finished = self.served.name, list(enumerate(zip(texts, reasons, strict=True)))
        if chat:
            body = envelope(new_id("chatcmpl"), "chat.completion", name)
            body["choices"] = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                                "logprobs": None, "finish_reason": r} for i, (t, r) in finished]
        else:
            body = envelope(new_id("cmpl"), "text_completion", name)
            body["choices"] = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": r}
                               for i, (t, r) in finished]
        body["usage"] = self.usage(completion_tokens)
        return JSONResponse(body)

    async def stream_completion(self) -> AsyncIterator[dict | str]:
        head = envelope(new_id("cmpl"), "text_completion", self.served.name)

        def chunk(choices: list[dict]) -> dict:
            return {**head, "choices": choices, **({"usage": None} if self.include_usage else {})}

        async for item in self._stream(chunk, lambda i, text, reason: {
                "index": i, "text": text, "logprobs": None, "finish_reason": reason}):
            yield item

    async def stream_chat(self) -> AsyncIterator[dict | str]:
        head = envelope(new_id("chatcmpl"), "chat.completion.chunk", self.served.name)

        def chunk(choices: list[dict]) -> dict:
            return {**head, "choices": choices, **({"usage": None} if self.include_usage else {})}

        def choice(i: int, text: str, reason: str | None) -> dict:
            delta = {"content": text} if text or reason is None else {}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

        for i in range(len(self.prompts) * self.n):  # the role comes first, as OpenAI sends it
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for item in self._stream(chunk, choice):
            yield item

    async def _stream(self, chunk, choice) -> AsyncIterator[dict | str]:
        completion_tokens = 0
        async for index, event in self.events(None):
            if event.error:
                yield error_body(event.error, type="server_error")
                return
            if event.text:
                yield chunk([choice(index, event.text, None)])
            if event.finish_reason:
                completion_tokens += event.completion_tokens
                yield chunk([choice(index, "", event.finish_reason)])
        if self.include_usage:
            yield {**chunk([]), "usage": self.usage(completion_tokens)}
        yield "[DONE]"


def wait_until_ready(app: FastAPI, timeout: float | None = None) -> bool:
    """Block until the app's model is loaded (True) or loading failed / timed out (False)."""
    state: _State = app.state.fastgpt
    deadline = None if timeout is None else time.monotonic() + timeout
    while not state.ready.wait(0.05):
        if state.error or (deadline is not None and time.monotonic() > deadline):
            return False
    return True
