"""Write a file so that readers see the old version or the new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def replace_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
