"""`fastgpt download` against a local HTTP server: resume, hash checks, cache hits, errors.

The server (127.0.0.1, a thread of this process) imitates the two canonical hosts:
Hub paths that redirect large files to a "CDN" path carrying `X-Linked-ETag`, and
plain files, with HTTP Range support. No test touches the network.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading

import pytest

from fastgpt.cli import main
from fastgpt.errors import FastGPTError
from fastgpt.weights import load_pretrained, resolve
from fastgpt.weights.download import MANIFEST, download_model, file_urls

CONFIG = b'{"model_type": "gpt2"}\n'
WEIGHTS = bytes(range(256)) * 4000  # 1 MB, larger than one read chunk


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` (path -> bytes); `redirects` (path -> (target, headers)); logs every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.redirects, self.log = {}, {}, []
        self.bytes_sent = 0
        self.cut_after = None  # send only this many body bytes, then drop the connection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        if self.path in server.redirects:
            target, headers = server.redirects[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in server.files:
            self.send_error(404, "Entry not found")
            return
        data, start = server.files[self.path], 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            body = body[:server.cut_after]
            self.close_connection = True
        server.bytes_sent += len(body)  # counted before sending: the client may finish before we return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def serve_hub(server, weights=WEIGHTS, linked_sha256=None):
    """The Hub's layout for gpt2: config.json served directly, model.safetensors redirected with its sha256."""
    base = "/openai-community/gpt2/resolve/main"
    server.files[f"{base}/config.json"] = CONFIG
    server.files["/cdn/blob-1"] = weights
    sha = linked_sha256 or hashlib.sha256(weights).hexdigest()
    server.redirects[f"{base}/model.safetensors"] = ("/cdn/blob-1", {"X-Linked-ETag": f'"{sha}"',
                                                                     "X-Linked-Size": str(len(weights))})


def download(server, tmp_path, **kwargs):
    return download_model("gpt2", tmp_path / "cache", base_url=server.url, progress=False, timeout=10, **kwargs)


def test_download_verifies_and_records_then_cache_hit_makes_no_request(server, tmp_path):
    serve_hub(server)
    directory = download(server, tmp_path)
    assert directory == tmp_path / "cache" / "gpt2"
    assert (directory / "config.json").read_bytes() == CONFIG
    assert (directory / "model.safetensors").read_bytes() == WEIGHTS
    assert not list(directory.glob("*.part"))
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["model.safetensors"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert manifest["model.safetensors"]["verified_against"] == "X-Linked-ETag"
    assert manifest["config.json"]["verified_against"].startswith("nothing yet")
    requests = len(server.log)
    assert download(server, tmp_path) == directory
    assert len(server.log) == requests  # everything cached: not a single request


def test_resume_after_truncated_part(server, tmp_path):
    serve_hub(server)
    directory = tmp_path / "cache" / "gpt2"
    directory.mkdir(parents=True)
    half = len(WEIGHTS) // 2 + 17
    (directory / "model.safetensors.part").write_bytes(WEIGHTS[:half])
    download(server, tmp_path)
    assert (directory / "model.safetensors").read_bytes() == WEIGHTS
    assert ("/cdn/blob-1", f"bytes={half}-") in server.log  # the range survived the redirect
    assert server.bytes_sent == len(CONFIG) + len(WEIGHTS) - half  # only the missing bytes travelled


def test_interrupted_transfer_resumes_on_the_next_run(server, tmp_path):
    serve_hub(server)
    server.cut_after = 300_000
    with pytest.raises(FastGPTError, match="run the command again to resume"):
        download(server, tmp_path)
    directory = tmp_path / "cache" / "gpt2"
    assert not (directory / "model.safetensors").exists()
    assert (directory / "model.safetensors.part").stat().st_size == 300_000
    server.cut_after = None
    download(server, tmp_path)
    assert (directory / "model.safetensors").read_bytes() == WEIGHTS


def test_hash_mismatch_is_rejected(server, tmp_path):
    serve_hub(server, linked_sha256="0" * 64)
    with pytest.raises(FastGPTError, match=r"sha256 [0-9a-f]{64} does not match 0{64} \(from X-Linked-ETag\)"):
        download(server, tmp_path)
    directory = tmp_path / "cache" / "gpt2"
    assert not (directory / "model.safetensors").exists() and not (directory / "model.safetensors.part").exists()


def test_changed_file_fails_against_the_first_download(server, tmp_path):
    serve_hub(server)
    directory = download(server, tmp_path)
    (directory / "config.json").unlink()
    server.files["/openai-community/gpt2/resolve/main/config.json"] = b'{"model_type": "evil"}'
    with pytest.raises(FastGPTError, match=r"config\.json: sha256 .* \(from the first download\)"):
        download(server, tmp_path)
    assert not (directory / "config.json").exists()


def test_http_and_network_errors_are_one_line(server, tmp_path):
    with pytest.raises(FastGPTError, match=r"config\.json: HTTP error 404"):
        download(server, tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(FastGPTError, match=r"cannot reach 127\.0\.0\.1:\d+ .*check the network"):
        download_model("gpt2", tmp_path / "c", base_url=closed, progress=False, timeout=5)
    with pytest.raises(FastGPTError, match="unknown model 'gpt5'"):
        file_urls("gpt5")


def test_canonical_urls():
    assert file_urls("gpt2-medium") == [
        ("config.json", "https://huggingface.co/openai-community/gpt2-medium/resolve/main/config.json"),
        ("model.safetensors", "https://huggingface.co/openai-community/gpt2-medium/resolve/main/model.safetensors")]
    urls = dict(file_urls("gpt2-xl", "openai"))
    assert urls["model.ckpt.index"] == "https://openaipublic.blob.core.windows.net/gpt-2/models/1558M/model.ckpt.index"
    assert set(urls) >= {"hparams.json", "checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.meta"}


def test_cli_downloads_openai_release_and_the_model_loads(server, tmp_path, capsys, monkeypatch):
    """End to end: `fastgpt download --format openai` from a mirror, then load_pretrained on the result."""
    import torch
    from tf_checkpoint import write_openai_release
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    release = write_openai_release(tmp_path / "release", hf)
    (release / "model.ckpt.meta").write_bytes(b"graph")
    for name in ("encoder.json", "vocab.bpe"):
        (release / name).write_bytes(b"bpe")
    for path in release.iterdir():
        server.files[f"/gpt-2/models/124M/{path.name}"] = path.read_bytes()
    code = main(["download", "gpt2", "--format", "openai", "--dir", str(tmp_path / "cache"),
                 "--base-url", server.url, "--no-progress"])
    assert code == 0
    directory = tmp_path / "cache" / "gpt2-openai"
    assert capsys.readouterr().out.strip() == str(directory)
    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path / "cache"))
    idx = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        expected = hf(idx).logits  # same fp32 weights: only summation order differs (a few ulps)
        torch.testing.assert_close(load_pretrained(directory)(idx), expected, rtol=0,
                                   atol=16 * torch.finfo(torch.float32).eps * expected.abs().max().item())
    with pytest.raises(FastGPTError, match=r"gpt2: not downloaded yet \(run: fastgpt download gpt2\)"):
        load_pretrained("gpt2")  # the bare name means the HF-format cache, which is empty here
    (tmp_path / "cache" / "gpt2").mkdir()
    assert resolve("gpt2") == tmp_path / "cache" / "gpt2"
    server.files.clear()
    code = main(["download", "gpt2", "--dir", str(tmp_path / "cache"), "--base-url", server.url, "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("fastgpt download: error: ")
