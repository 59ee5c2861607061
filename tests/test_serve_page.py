"""The chat page at / in a real headless browser (Debian's Chromium driven by Playwright),
and the `fastgpt serve` command itself in its own process.

Without Chromium the browser test skips, except under CI (CI=true), where a missing
browser is a failure: .ci/run installs it.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import free_port, running_server, served_tiny, varied_model

from fastgpt.cli import main
from fastgpt.weights import save_fastgpt

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need_browser():
    reason = None
    if not os.path.exists(CHROMIUM):
        reason = "Chromium is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def slow_tiny():
    """The tiny model with an Alpaca template, 20 ms per forward pass at least, so that the Stop
    button has a running answer to stop."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model = varied_model()
    # the final LayerNorm runs once per forward pass, prefill or decode step
    model.ln_f.register_forward_pre_hook(lambda _module, _args: time.sleep(0.02))
    yield model
    torch.set_num_threads(previous)


def test_chat_page_streams_answers_keeps_the_conversation_and_stops(slow_tiny, tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    with running_server(served_tiny(slow_tiny, "alpaca"), max_batch=4) as server, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=FLAGS, viewport={"width": 900,
                                                                                            "height": 620})
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('template alpaca')")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            conversation = []
            for turn, question in enumerate(["Write a short greeting.", "And a farewell?"]):
                page.fill("#input", question)
                page.press("#input", "Enter")
                answer = page.wait_for_selector(f".msg.assistant >> nth={turn}")
                page.wait_for_selector(f".msg.assistant[data-done] >> nth={turn}")
                shown = answer.evaluate("e => e.firstChild ? e.firstChild.textContent : ''")
                conversation.append({"role": "user", "content": question})
                # the page sent the whole conversation: the API gives the same answer to it
                api = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
                    "messages": conversation, "temperature": 0, "max_tokens": 12}).json()
                assert shown == api["choices"][0]["message"]["content"] and shown.strip()
                conversation.append({"role": "assistant", "content": shown})
            shot = tmp_path / "serve-chat.png"
            page.screenshot(path=str(shot))
            if os.environ.get("FASTGPT_SCREENSHOT"):
                shutil.copy(shot, os.environ["FASTGPT_SCREENSHOT"])

            # New chat, then Stop: a long answer is cancelled in the browser and its slot freed on the server
            page.click("#reset")
            assert page.locator(".msg").count() == 0
            page.fill("#max-tokens", "150")
            page.fill("#input", "Tell me everything.")
            page.press("#input", "Enter")
            page.wait_for_function("(document.querySelector('.msg.assistant')?.textContent || '').length > 0")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-done='stopped']")
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            deadline = time.monotonic() + 10
            while server.engine.cancelled < 1 or server.engine.load() != (0, 0):
                assert time.monotonic() < deadline, "the stopped request kept its slot"
                time.sleep(0.05)
        finally:
            browser.close()


def test_fastgpt_serve_command_serves_a_saved_model(tmp_path):
    """The CLI end to end: a saved model with a template, an API key from the environment."""
    model_dir = save_fastgpt(varied_model(), tmp_path / "model", metadata={"template": "alpaca"})
    port = free_port()
    env = dict(os.environ, FASTGPT_API_KEY="k3y")
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-batch", "2", "--log-level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fastgpt serve did not become healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["model"]
        reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.stdout.read()


def test_fastgpt_serve_with_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing"), "--port", str(free_port()),
                 "--log-level", "warning"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fastgpt serve: error:") and "nothing" in last


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--max-queue", "-1"), ("--port", "70000"),
                                         ("--threads", "0")])
def test_fastgpt_serve_bad_flags_are_one_line(flag, value, capsys):
    assert main(["serve", "--model", "x", flag, value]) == 2
    assert capsys.readouterr().err.strip().startswith(f"fastgpt serve: error: {flag}")
