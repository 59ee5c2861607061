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


def read_records(path: str | os.PathLike, fields: tuple[str, ...], kind: str = "records") -> list[dict]:
    """JSON objects from a JSON list or a JSON-lines file, each with the string `fields`
    (`input` may be absent: it means empty). Errors name the file and the record (or line)."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        located = [(f"{path}:{lineno}", value) for lineno, value in read_jsonl(path)]
    else:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise FastGPTError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise FastGPTError(f"{path}: expected a JSON list of {kind} (or use a .jsonl file)")
        located = [(f"{path}: record {i}", value) for i, value in enumerate(data)]
    if not located:
        raise FastGPTError(f"{path}: no records")
    records = []
    for where, record in located:
        if not isinstance(record, dict):
            raise FastGPTError(f"{where}: expected a JSON object with {', '.join(fields)}")
        for name in fields:
            if name != "input" and name not in record:
                raise FastGPTError(f"{where}: missing field {name!r}")
            if not isinstance(record.get(name, ""), str):
                raise FastGPTError(f"{where}: field {name!r} must be a string")
        records.append({**record, "input": record.get("input", "")})
    return records


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
