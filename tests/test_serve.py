"""`fastgpt serve` as its users meet it: the official `openai` client and plain HTTP against a
real server on 127.0.0.1 (a random free port), with a tiny random model.

Every generated text is compared with what `fastgpt.generate.generate` produces for the same
prompt alone (the `fastgpt generate` path), so batching, streaming and stop handling cannot
change an answer unnoticed.
"""
import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import CONTEXT, running_server, served_tiny, varied_model, wait_idle

from fastgpt.generate import TextStream, generate
from fastgpt.tokenizer import Tokenizer

TOK = Tokenizer()


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds hand-offs on a busy CPU
    yield varied_model()
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def server(model):
    with running_server(served_tiny(model, "alpaca"), max_batch=16, max_queue=64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(model, prompt_ids, max_tokens, stops=(), **sampling):
    """(text, finish_reason, completion_tokens) of one prompt generated alone."""
    sampling.setdefault("temperature", 0)
    result = generate(model, [prompt_ids], max_tokens, eos_id=TOK.eot_id, stop_strings=list(stops) or None,
                      tokenizer=TOK, **sampling)
    stream = TextStream(TOK, stops)
    text = "".join(stream.push(t) for t in result.tokens[0]) + stream.finish()
    reason = result.finish_reasons[0]
    return text, "length" if reason == "length" else "stop", len(result.tokens[0]) + (reason == "eos")


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a text/event-stream response, JSON-decoded ([DONE] kept as a string)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---------------------------------------------------------------------- the openai client
def test_completion_is_the_generate_text_with_usage(client, model):
    prompt = "The meaning of life is"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    text, reason, n = expected(model, TOK.encode(prompt), 12)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason) == (text, reason) and text
    assert response.usage.prompt_tokens == len(TOK.encode(prompt))
    assert response.usage.completion_tokens == n
    assert response.usage.total_tokens == response.usage.prompt_tokens + n
    assert response.model == "tiny" and response.object == "text_completion"


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_goes_through_the_alpaca_template(client, model):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    template_prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.<|endoftext|>"
                       "Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\nAnother one?\n\n### Response:\n")
    text, reason, n = expected(model, TOK.encode(template_prompt), 10, stops=["### Instruction:", "### Response:"])
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (text, reason)
    assert response.usage.prompt_tokens == len(TOK.encode(template_prompt))
    assert response.usage.completion_tokens == n


def test_streaming_chat_equals_the_whole_answer_and_reports_usage(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=14,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_is_server_sent_events_ending_in_done(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_stop_string_spanning_tokens_is_cut_from_the_output(client, model):
    prompt = "In the beginning"
    ids = TOK.encode(prompt)
    tokens = generate(model, [ids], 16, temperature=0, eos_id=TOK.eot_id).tokens[0]
    pieces = [TOK.decode([t]) for t in tokens]
    full = "".join(pieces)
    # a stop made of the last 2 characters of one token and the first 2 of the next
    k = next(k for k in range(3, len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2
             and full.find(pieces[k][-2:] + pieces[k + 1][:2]) == len("".join(pieces[:k + 1])) - 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = full.index(stop)
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == full[:cut]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == k + 2  # the tokens the model did generate, stop included
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]


def test_seeded_sampling_repeats_and_matches_generate(client, model):
    prompt = "A seed makes sampling"
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=10, temperature=0.9, seed=7)
    first = client.completions.create(**kwargs, extra_body={"top_k": 40}).choices[0].text
    again = client.completions.create(**kwargs, extra_body={"top_k": 40}).choices[0].text
    text, _, _ = expected(model, TOK.encode(prompt), 10, temperature=0.9, top_k=40, seed=7)
    assert first == again == text
    two = client.completions.create(**kwargs, n=2, extra_body={"top_k": 40})
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == text  # choice j samples with seed + j
    assert two.choices[1].text == expected(model, TOK.encode(prompt), 10, temperature=0.9, top_k=40, seed=8)[0]


def test_temperature_zero_is_greedy_not_unset(client, model):
    prompt = "Zero is a value"
    greedy = expected(model, TOK.encode(prompt), 8)[0]
    texts = {client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
             for _ in range(2)}
    assert texts == {greedy}


# ---------------------------------------------------------------------- continuous batching under load
def test_32_concurrent_streaming_clients_each_get_their_sequential_greedy_answer(server, model):
    prompts = [f"Client {i} asks about {word}" for i, word in
               enumerate(["rivers", "stars", "bread", "music", "glass", "snow", "iron", "paper"] * 4)]
    max_tokens = [6 + i % 7 for i in range(len(prompts))]  # ragged: sequences finish and slots free at different steps
    want = [expected(model, TOK.encode(p), m)[:2] for p, m in zip(prompts, max_tokens, strict=True)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(prompt, max_tok):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tok, temperature=0,
                                                 stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_clients():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens,
                                                                                      strict=True))), 120)
        finally:
            await client.close()

    steps_before = server.engine.steps
    got = asyncio.run(all_clients())
    assert got == want
    assert server.engine.peak_batch > 1 and server.engine.peak_prefill > 1  # they really ran together
    assert server.engine.steps - steps_before < sum(max_tokens)
    assert wait_idle(server.url)["active"] == 0


def test_concurrent_requests_keep_their_own_sampling_parameters_and_seeds(server, model):
    """Greedy and seeded sampled requests (different temperatures, top-k, top-p) in one batch:
    each gets what `generate` gives its prompt alone with its own parameters."""
    jobs = [dict(prompt=f"Mixed batch {i}:", max_tokens=8, temperature=0) if i % 2 == 0 else
            dict(prompt=f"Mixed batch {i}:", max_tokens=8, temperature=0.5 + i / 10, seed=100 + i,
                 top_p=0.9 if i % 3 else None, top_k=20 if i % 3 == 0 else None) for i in range(8)]
    want = [expected(model, TOK.encode(j["prompt"]), 8, temperature=j["temperature"], seed=j.get("seed"),
                     top_k=j.get("top_k"), top_p=j.get("top_p"))[0] for j in jobs]

    async def all_jobs():
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=j) for j in jobs))
        return [r.json()["choices"][0]["text"] for r in responses]

    assert asyncio.run(all_jobs()) == want


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, words", [
    (b'{"prompt": "x", "max_tokens": 5', "not valid JSON"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"max_tokens": 5}', "prompt"),
    (b'{"prompt": "x", "max_tokens": -3}', "max_tokens must be >= 1"),
    (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "temperature": 3}', "temperature must be in [0, 2]"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "x", "n": 0}', "n must be between"),
    (b'{"prompt": "x", "stop": 5}', "stop"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"prompt": "x", "logprobs": 2}', "logprobs is not supported"),
    (b'{"prompt": "x", "seed": 99999999999999999999}', "seed must be a 64-bit"),
    (b'{"prompt": "x", "top_k": -5}', "top_k"),
    (b'{"prompt": [99999999]}', "token id 99999999"),
    (b'{"prompt": "' + b"word " * CONTEXT + b'"}', f"maximum context length is {CONTEXT}"),
    (b'{"prompt": "x", "max_tokens": %d}' % CONTEXT, f"maximum context length is {CONTEXT}"),
])
def test_bad_completion_requests_are_400_with_a_clear_message(server, body, words):
    response = httpx.post(f"{server.url}/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_requests_are_400_and_the_server_keeps_serving(server, client):
    for messages, words in [([], "empty"), ([{"role": "user"}, {"role": "assistant", "content": "x"}], "last message"),
                            ([{"role": "wizard", "content": "x"}], "role"), ("hello", "messages")]:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages})
        assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    ok = client.completions.create(model="tiny", prompt="still alive", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_body_over_the_limit_is_refused(server):
    big = json.dumps({"prompt": "x" * (2 << 20)})
    assert httpx.post(f"{server.url}/v1/completions", content=big).status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b" " * 65536
    response = httpx.post(f"{server.url}/v1/completions", content=chunks())
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_a_page_of_another_site_cannot_use_the_server(server):
    """A cross-site page can send a plain-text POST without asking the browser first, and
    reach 127.0.0.1 under its own name through DNS rebinding: both are refused."""
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    plain = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    rebound = httpx.post(f"{server.url}/v1/completions", content=body,
                         headers={"content-type": "application/json", "host": "evil.example"})
    assert rebound.status_code == 400
    ok = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 200


def test_chat_without_a_template_is_400_that_says_so(model):
    with running_server(served_tiny(model, template=None)) as running:
        response = httpx.post(f"{running.url}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
        assert httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------------- auth, loading
def test_api_key_guards_every_v1_route(model):
    with running_server(served_tiny(model), api_key="s3cret") as running:
        url = running.url
        for path, method in [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
                response = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200   # health and the page stay open
        assert httpx.get(f"{url}/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_health_is_503_while_the_model_loads(model):
    import threading
    release = threading.Event()

    def load():
        release.wait(20)
        return served_tiny(model)

    with running_server(load=load) as running:
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert httpx.post(f"{running.url}/v1/completions", json={"prompt": "x"}).status_code == 503
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{running.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ---------------------------------------------------------------------- disconnects, overload
def slow_model(seconds_per_step: float):
    """The tiny model, taking at least `seconds_per_step` per forward pass, so a request is still
    running when the test acts on it."""
    slow = varied_model()
    # the final LayerNorm runs once per forward pass, prefill or decode step
    slow.ln_f.register_forward_pre_hook(lambda _module, _args: time.sleep(seconds_per_step))
    return slow


def test_a_client_that_disconnects_mid_stream_frees_its_slot():
    with running_server(served_tiny(slow_model(0.05)), max_batch=1, max_queue=0) as running:
        body = {"prompt": "Going, going", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
        # the connection is closed after the first chunk, ~5 s before the request would end
        started = time.monotonic()
        assert wait_idle(running.url, timeout=10)["active"] == 0
        assert time.monotonic() - started < 2.0
        assert running.engine.cancelled == 1
        again = httpx.post(f"{running.url}/v1/completions", json={"prompt": "next", "max_tokens": 2}, timeout=30)
        assert again.status_code == 200


def test_a_waiting_non_streaming_client_that_goes_away_frees_its_slot():
    with running_server(served_tiny(slow_model(0.05)), max_batch=1, max_queue=0) as running:
        with pytest.raises(httpx.ReadTimeout):  # gives up after 0.5 s of a ~5 s answer and closes
            httpx.post(f"{running.url}/v1/completions", json={"prompt": "Wait", "max_tokens": 100}, timeout=0.5)
        started = time.monotonic()
        assert wait_idle(running.url, timeout=10)["active"] == 0
        assert time.monotonic() - started < 2.0 and running.engine.cancelled == 1


def test_a_full_queue_answers_503_at_once_with_retry_after():
    with running_server(served_tiny(slow_model(0.05)), max_batch=1, max_queue=1) as running:
        url = running.url
        body = {"prompt": "Busy", "max_tokens": 40, "stream": True}
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", f"{url}/v1/completions", json=body) as first, \
                    b.stream("POST", f"{url}/v1/completions", json=body) as second:
                assert first.status_code == second.status_code == 200  # one decodes, one waits
                started = time.monotonic()
                third = httpx.post(f"{url}/v1/completions", json={"prompt": "me too", "max_tokens": 2}, timeout=30)
                assert time.monotonic() - started < 1.0
                assert third.status_code == 503 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
        assert wait_idle(url)["active"] == 0
        after = httpx.post(f"{url}/v1/completions", json={"prompt": "now", "max_tokens": 2}, timeout=30)
        assert after.status_code == 200


# ---------------------------------------------------------------------- fastgpt bench serve
def test_bench_serve_measures_a_running_server(server, tmp_path):
    from fastgpt.bench import serve as bench_serve

    rows = bench_serve.run(url=server.url, clients=3, requests_per_client=2, max_tokens=4, out_dir=tmp_path)
    assert [(r.name, r.backend) for r in rows] == [("serve_throughput", "sequential"), ("serve_ttft", "sequential"),
                                                   ("serve_throughput", "3 clients"), ("serve_ttft", "3 clients")]
    for row in rows[0], rows[2]:
        assert row.unit == "tokens/s" and row.median > 0 and "tokens=24;" in row.extra  # 6 requests x 4 tokens
    assert rows[1].unit == rows[3].unit == "ms" and "p99=" in rows[3].extra
    assert "| serve_throughput |" in (tmp_path / "serve.md").read_text()
