"""Serving throughput: N concurrent streaming clients against `fastgpt serve` on loopback,
against the same requests served one at a time (what a server behind a global lock does).

Each client sends its share of the requests back to back (a closed loop), streaming, greedy,
with distinct prompts. Measured from the client side, as users see it: total completion
tokens per second of wall time, and time to first token (request sent -> first text chunk),
p50 and p99. Without --url a server is started in its own process (random weights: no
download) and stopped at the end; either way everything stays on 127.0.0.1.

    fastgpt bench serve --sizes gpt2                       # GPT-2 124M, 16 clients
    python3 -m fastgpt.bench.serve --url http://127.0.0.1:8000 --clients 16
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import httpx
except ImportError:  # a dev/serve dependency: the suite then skips with a message
    httpx = None

from ..errors import FastGPTError
from ..runtime import dtype_name, resolve_device, resolve_dtype
from .common import Row, markdown_table, suite_main, write_results

SIZE_SETS = {
    # preset, clients, requests per client, new tokens per request
    "tiny": {"preset": "tiny", "clients": 4, "requests": 2, "max_tokens": 16},
    "gpt2": {"preset": "gpt2", "clients": 16, "requests": 2, "max_tokens": 64},
}
BASELINE = "sequential"
WORDS = ["river", "mountain", "engine", "garden", "letter", "window", "harbor", "forest", "signal", "market",
         "winter", "castle", "bridge", "lantern", "orchard", "compass"]


@dataclass
class Result:
    """One request as the client saw it."""
    ttft_s: float
    total_s: float
    completion_tokens: int


def prompts(count: int) -> list[str]:
    """Distinct prompts of about a dozen GPT-2 tokens."""
    return [f"Request {i}: a short story about the {WORDS[i % len(WORDS)]} and the "
            f"{WORDS[(i * 7 + 3) % len(WORDS)]}, told" for i in range(count)]


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise FastGPTError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise FastGPTError(f"{url}: {chunk['error']['message']}")
            if ttft is None and any(c.get("text") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return Result(ttft if ttft is not None else total, total, tokens)


async def serve_requests(url: str, model: str, texts: list[str], max_tokens: int, clients: int
                         ) -> tuple[float, list[Result]]:
    """(wall seconds, results): `clients` loops, each sending its share of `texts` back to back."""
    shares = [texts[c::clients] for c in range(clients)]
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=_auth()) as client:
        async def loop(share):
            return [await one_request(client, url, model, text, max_tokens) for text in share]
        start = time.perf_counter()
        per_client = await asyncio.gather(*(loop(share) for share in shares))
        wall = time.perf_counter() - start
    return wall, [r for results in per_client for r in results]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`fastgpt serve --random-init` in its own process, on a free loopback port."""

    def __init__(self, preset: str, device: str, max_batch: int, threads: int | None):
        self.url = f"http://127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "fastgpt", "serve", "--model", preset, "--random-init",
                   "--port", self.url.rsplit(":", 1)[1], "--device", device, "--max-batch", str(max_batch),
                   "--max-queue", str(4 * max_batch), "--log-level", "warning"]
        if threads:
            command += ["--threads", str(threads)]
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastgpt-bench-serve-{os.getpid()}.log"
        self.log_file = self.log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise FastGPTError(f"the server exited ({self.process.returncode}); its log: {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise FastGPTError(f"the server did not become healthy in {timeout:.0f} s; its log: {self.log}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


def _served_model(url: str) -> str:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=10, headers=_auth())
    except httpx.TransportError as err:
        raise FastGPTError(f"--url {url}: no server answers ({err})") from None
    if response.status_code != 200:
        raise FastGPTError(f"--url {url}: /v1/models answered {response.status_code} (set FASTGPT_API_KEY?)")
    return response.json()["data"][0]["id"]


def _auth() -> dict:
    key = os.environ.get("FASTGPT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def measure(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, tuple[float, list]]:
    """{"sequential": (wall, results), "<N> clients": (wall, results)} for the same requests."""
    model = _served_model(url)
    texts = prompts(clients * requests_per_client)
    asyncio.run(serve_requests(url, model, prompts(1), max_tokens, 1))  # warm-up (allocator, first kernels)
    runs = {}
    for label, n in ((BASELINE, 1), (f"{clients} clients", clients)):
        wall, results = asyncio.run(serve_requests(url, model, texts, max_tokens, n))
        runs[label] = (wall, results)
        tokens = sum(r.completion_tokens for r in results)
        ttft = [r.ttft_s * 1e3 for r in results]
        print(f"serve: {label:>12}: {len(results)} requests, {tokens} tokens in {wall:.1f} s = "
              f"{tokens / wall:.1f} tokens/s; time to first token p50 {percentile(ttft, 50):.0f} ms, "
              f"p99 {percentile(ttft, 99):.0f} ms", flush=True)
    return runs


def run(device: str = "cpu", sizes: str = "tiny", out_dir: str | None = None, url: str | None = None,
        clients: int | None = None, requests_per_client: int | None = None, max_tokens: int | None = None,
        threads: int | None = None) -> list[Row]:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if httpx is None or missing:
        print(f"serve: skipped: needs {', '.join(missing + (['httpx'] if httpx is None else []))} "
              f"(pip install 'fastgpt[serve]' httpx)")
        return []
    if sizes not in SIZE_SETS:
        raise FastGPTError(f"serve: unknown sizes {sizes!r} (choose from: {', '.join(SIZE_SETS)})")
    spec = SIZE_SETS[sizes]
    clients = clients or spec["clients"]
    requests_per_client = requests_per_client or spec["requests"]
    max_tokens = max_tokens or spec["max_tokens"]
    if clients < 1 or requests_per_client < 1 or max_tokens < 1:
        raise FastGPTError("serve: --clients, --requests-per-client and --max-tokens must be >= 1")
    server = None
    if url is None:
        server = _Server(spec["preset"], device, clients, threads)
        print(f"serve: started fastgpt serve --model {spec['preset']} --random-init at {server.url} "
              f"(log: {server.log})", flush=True)
    try:
        if server is not None:
            server.wait_healthy()
        runs = measure(url or server.url, clients, requests_per_client, max_tokens)
    finally:
        if server is not None:
            server.stop()
    rows = []
    shape = f"{clients * requests_per_client} requests x {max_tokens} new tokens"
    what = f"{spec['preset']} random weights" if url is None else url
    # the server's machine and threads, not this client process's
    where = f"{device} server, threads={threads or 'default'}, {os.cpu_count()} CPUs" if url is None else url
    # the dtype a started server resolves from --dtype auto (an outside server's is its own)
    dtype = dtype_name(resolve_dtype("auto", resolve_device(device), "inference")) if url is None else "server's"
    for label, (wall, results) in runs.items():
        tokens = sum(r.completion_tokens for r in results)
        ttft = [r.ttft_s * 1e3 for r in results]
        extra = (f"model={what};wall_s={wall:.2f};tokens={tokens};ttft_p50_ms={percentile(ttft, 50):.1f};"
                 f"ttft_p99_ms={percentile(ttft, 99):.1f}")
        rows.append(Row("serve_throughput", label, shape, dtype, tokens / wall, tokens / wall, tokens / wall,
                        "tokens/s", device=where, extra=extra))
        rows.append(Row("serve_ttft", label, shape, dtype, percentile(ttft, 50), percentile(ttft, 20),
                        percentile(ttft, 80), "ms", device=where, extra=f"p99={percentile(ttft, 99):.1f}"))
    base = rows[0].median
    concurrent = rows[2].median
    threads_note = f", server threads {threads}" if url is None and threads else ""
    print(f"serve: {clients} clients give {concurrent / base:.2f}x the tokens/s of one-at-a-time serving "
          f"(machine: {os.cpu_count()} CPUs{threads_note})", flush=True)
    if out_dir is not None:
        write_results(rows, out_dir, "serve", "# serve\n\n" + markdown_table(rows, baseline=BASELINE))
    return rows


def _add_arguments(parser) -> None:
    parser.add_argument("--url", default=None, help="a running fastgpt serve (default: start one with random weights)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default: by --sizes)")
    parser.add_argument("--requests-per-client", type=int, default=None, help="requests each client sends")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="the started server's CPU threads")


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, "serve", __doc__, SIZE_SETS, run, BASELINE, _add_arguments,
                      lambda a: dict(url=a.url, clients=a.clients, requests_per_client=a.requests_per_client,
                                     max_tokens=a.max_tokens, threads=a.threads))


if __name__ == "__main__":
    sys.exit(main())
