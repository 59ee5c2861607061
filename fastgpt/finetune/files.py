"""Reading user data files with errors that name the file and line, and writing outputs atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FastGPTError
from ..weights.atomic import replace_file


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8; a missing, empty or non-UTF-8 file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FastGPTError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise FastGPTError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x})") from None
    if not text.strip():
        raise FastGPTError(f"{path}: file is empty")
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first field


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise FastGPTError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
    return rows


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, write)


def write_json(path: str | os.PathLike, value) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")
    write_atomic(path, write)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    write_atomic(path, write)
