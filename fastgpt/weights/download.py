"""Download the released GPT-2 weights: resumable, checksummed, cached.

Sources are the canonical ones: the Hugging Face Hub (`openai-community/<model>`,
config.json + model.safetensors) or OpenAI's own bucket (the TensorFlow release).
Each file streams into `<file>.part`; an interrupted download continues from where
it stopped with an HTTP Range request, and only a complete, verified file is renamed
into place. The sha256 to verify against comes from

1. the Hub itself: for large (LFS) files its redirect carries `X-Linked-ETag`, the sha256;
2. otherwise trust on first use: the hash of the first complete download is recorded
   in `fastgpt-download.json`, and any later download of the same file must match it.

A file that is present with its recorded size is a cache hit and costs no request.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import FastGPTError
from .atomic import replace_file

MODELS = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
FORMATS = ("hf", "openai")
HF_BASE = "https://huggingface.co"
OPENAI_BASE = "https://openaipublic.blob.core.windows.net"
HF_FILES = ("config.json", "model.safetensors")
OPENAI_FILES = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index",
                "model.ckpt.meta", "model.ckpt.data-00000-of-00001")
MANIFEST = "fastgpt-download.json"
CHUNK = 1 << 20
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTGPT_CACHE", "~/.cache/fastgpt")).expanduser()


def model_directory(model: str, root: str | Path | None = None, fmt: str = "hf") -> Path:
    root = Path(root).expanduser() if root else default_cache_dir()
    return root / (model if fmt == "hf" else f"{model}-openai")


def file_urls(model: str, fmt: str = "hf", base_url: str | None = None) -> list[tuple[str, str]]:
    """(file name, URL) of every file of `model` in format `fmt`; `base_url` replaces the host (a mirror)."""
    if model not in MODELS:
        raise FastGPTError(f"unknown model {model!r} (choose from: {', '.join(MODELS)})")
    if fmt == "hf":
        base = (base_url or HF_BASE).rstrip("/")
        return [(f, f"{base}/openai-community/{model}/resolve/main/{f}") for f in HF_FILES]
    if fmt == "openai":
        base = (base_url or OPENAI_BASE).rstrip("/")
        return [(f, f"{base}/gpt-2/models/{MODELS[model]}/{f}") for f in OPENAI_FILES]
    raise FastGPTError(f"unknown format {fmt!r} (choose from: {', '.join(FORMATS)})")


def download_model(model: str, root: str | Path | None = None, fmt: str = "hf", base_url: str | None = None,
                   progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch every file of `model` into its cache directory (skipping complete ones); returns the directory."""
    urls = file_urls(model, fmt, base_url)
    directory = model_directory(model, root, fmt)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FastGPTError(f"{directory}: cannot create directory ({err.strerror or err})") from None
    manifest = Manifest(directory / MANIFEST)
    for name, url in urls:
        fetch(url, directory / name, manifest, progress=progress, timeout=timeout)
    return directory


class Manifest:
    """The sha256 and size of each completed file of a directory, kept in a small JSON file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.records = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            raise FastGPTError(f"{path}: corrupt download record; delete it to re-verify the files") from None

    def get(self, name: str) -> dict | None:
        return self.records.get(name)

    def record(self, name: str, **fields) -> None:
        self.records[name] = fields
        text = json.dumps(self.records, indent=2, sort_keys=True) + "\n"
        replace_file(self.path, lambda tmp: tmp.write_text(text))


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but keep each redirect's headers: the Hub's 302 names the file's sha256."""

    def __init__(self):
        self.seen: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _linked_sha256(header_sets) -> str | None:
    for headers in header_sets:
        value = (headers.get("X-Linked-ETag") or "").strip().removeprefix("W/").strip('"').lower()
        if SHA256_HEX.match(value):
            return value
    return None


def fetch(url: str, dest: Path, manifest: Manifest, progress: bool = True, timeout: float = 60.0) -> str:
    """Make `dest` a verified copy of `url`; returns "cached" or "downloaded"."""
    record = manifest.get(dest.name)
    if record and dest.is_file() and dest.stat().st_size == record["size"]:
        return "cached"
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    redirects = _KeepRedirectHeaders()
    opener = urllib.request.build_opener(redirects)
    headers = {"User-Agent": "fastgpt"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the file is no longer than our part: it changed, start over
            part.unlink()
            return fetch(url, dest, manifest, progress, timeout)
        raise FastGPTError(f"{url}: HTTP error {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        host = urllib.parse.urlsplit(url).netloc
        raise FastGPTError(f"cannot reach {host} ({err.reason}); check the network connection") from None
    except (OSError, http.client.HTTPException) as err:
        raise FastGPTError(f"{url}: connection failed ({err})") from None

    with response:
        sha256, md5 = hashlib.sha256(), None
        if response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)
                raise FastGPTError(f"{url}: the server sent a different byte range than asked for "
                                   f"({response.headers.get('Content-Range')!r}); run the command again")
            mode = "ab"
            with open(part, "rb") as existing:  # the hash covers the whole file, kept part included
                for block in iter(lambda: existing.read(CHUNK), b""):
                    sha256.update(block)
        else:  # 200: the whole file (the server ignored the range, or we asked for none)
            mode, have = "wb", 0
            if response.headers.get("Content-MD5"):
                md5 = hashlib.md5()
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        received = have
        try:
            from tqdm import tqdm
            with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                               desc=dest.name, disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    sha256.update(block)
                    if md5:
                        md5.update(block)
                    received += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as err:
            raise FastGPTError(f"{url}: download interrupted after {received} bytes ({err}); "
                               "run the command again to resume") from None
    if total is not None and received != total:
        raise FastGPTError(f"{url}: download incomplete ({received} of {total} bytes); "
                           "run the command again to resume")
    expected_md5 = response.headers.get("Content-MD5") if md5 else None
    if md5 and base64.b64encode(md5.digest()).decode() != expected_md5:
        part.unlink()
        raise FastGPTError(f"{url}: MD5 does not match the server's Content-MD5; the download was discarded")
    digest = sha256.hexdigest()
    linked = _linked_sha256([*redirects.seen, response.headers])
    expected, source = (linked, "X-Linked-ETag") if linked else (
        (record["sha256"], "the first download") if record else (None, None))
    if expected and digest != expected:
        part.unlink()
        raise FastGPTError(f"{url}: sha256 {digest} does not match {expected} (from {source}); "
                           "the download was discarded")
    os.replace(part, dest)
    manifest.record(dest.name, sha256=digest, size=received, url=url,
                    verified_against=source or "nothing yet (recorded on first download)")
    return "downloaded"
