"""The OpenAI API's request fields, validated, and its response and error shapes.

Every client library speaks this dialect, so a request is checked the way OpenAI
checks it: a field of the wrong type, a negative `max_tokens` or a temperature out
of range is a 400 whose message names the field, in OpenAI's error object
({"error": {"message", "type", "param", "code"}}). Fields this server does not
implement are refused by name when they would change the answer (logprobs,
penalties, tools, ...) and ignored when they would not (`user`, unknown extras).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..sampling import SamplingParams

MAX_N = 16                 # choices per request
MAX_STOP = 16              # stop strings per request
COMPLETION_DEFAULT_TOKENS = 16   # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------- request models
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message]


# Fields that would change the answer but are not implemented: refused unless at their no-op value.
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


def parse(model_cls: type[BaseModel], body: bytes) -> Any:
    """The request body as `model_cls`, or a 400 that names what is wrong."""
    try:
        raw = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} "
                            f"column {err.colno}") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(raw).__name__}")
    for name, allowed in _UNSUPPORTED.items():
        if name in raw and not any(raw[name] == a and type(raw[name]) is type(a) for a in allowed):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    try:
        return model_cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        got = json.dumps(first.get("input"))[:80] if "input" in first else ""
        raise APIError(400, f"{where}: {first['msg']}" + (f" (got {got})" if got else ""),
                       param=str(first["loc"][0]) if first["loc"] else None) from None


# ---------------------------------------------------------------------- field checks
def sampling_params(req: _Sampling) -> SamplingParams:
    """temperature 0 is greedy (never "unset": only a missing field takes the default, 1)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2] (0 = greedy), got {temperature}", param="temperature")
    top_p = req.top_p
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = req.top_k
    if top_k is not None and top_k < -1:
        raise APIError(400, f"top_k must be >= 1 (0 or -1 = no limit), got {top_k}", param="top_k")
    return SamplingParams(temperature, top_k if top_k and top_k > 0 else None,
                          top_p if top_p is not None and top_p < 1 else None)


def requested_max_tokens(req: _Sampling) -> int | None:
    """max_tokens (or its newer name max_completion_tokens); None when neither is given."""
    value, name = req.max_tokens, "max_tokens"
    if value is None:
        value, name = req.max_completion_tokens, "max_completion_tokens"
    if value is not None and value < 1:
        raise APIError(400, f"{name} must be >= 1, got {value}", param=name)
    return value


def checked_seed(req: _Sampling) -> int | None:
    """The seed, within the 64-bit range a torch.Generator takes (choice j uses seed + j)."""
    if req.seed is not None and not -(2 ** 63) <= req.seed < 2 ** 63:
        raise APIError(400, f"seed must be a 64-bit signed integer, got {req.seed}", param="seed")
    return req.seed


def choices_per_prompt(req: _Sampling, max_batch: int) -> int:
    n = 1 if req.n is None else req.n
    limit = min(MAX_N, max_batch)
    if not 1 <= n <= limit:
        raise APIError(400, f"n must be between 1 and {limit}, got {n}", param="n")
    return n


def stop_strings(req: _Sampling) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


def completion_prompts(req: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: text is encoded, ids are checked; an empty text starts from <|endoftext|>."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt: an empty list", param="prompt")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            prompts.append(tokenizer.encode(item) or [tokenizer.eot_id])
            continue
        if not item:
            raise APIError(400, f"prompt[{i}]: an empty list of token ids", param="prompt")
        bad = next((t for t in item if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is not in [0, {vocab_size})", param="prompt")
        prompts.append(list(item))
    return prompts


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(id: str, object: str, model: str) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model}
