"""A run directory, the same for every training command: checkpoints named `ckpt_<step>`, the
newest `keep_last` kept, a fresh run refusing a directory with checkpoints unless `--overwrite`,
half-written checkpoints of a crash removed, and metrics of steps past the resumed checkpoint
dropped (they are redone). The checkpoint files themselves: `fastgpt.train.checkpoint`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ..errors import FastGPTError
from ..weights.atomic import replace_file
from . import checkpoint as ckpt_io
from .metrics import MetricsLog


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}"


def refuse_existing(run_dir: Path, overwrite: bool, flag: str, also: tuple[str, ...] = ()) -> list[Path]:
    """The checkpoints (and `also` directories) a fresh run would replace; an error unless `overwrite`."""
    run_dir = Path(run_dir)
    existing = ckpt_io.list_checkpoints(run_dir) + [run_dir / name for name in also if (run_dir / name).exists()]
    if existing and not overwrite:
        raise FastGPTError(f"{flag} {run_dir} already holds checkpoints ({existing[-1].name}); "
                           f"continue it with --resume {run_dir} or start over with --overwrite")
    return existing


def open_run_dir(run_dir: Path, resumed_step: int | None, log, replaced: list[Path] = (),
                 outputs: tuple[str, ...] = ()) -> MetricsLog:
    """Create the directory, remove a crash's half-written checkpoints, and start its metrics:
    fresh (`resumed_step` None: `replaced` checkpoints and the `outputs` files/dirs go) or cut
    back to the resumed step."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for partial in ckpt_io.clean_partial(run_dir):
        log(f"removed a half-written checkpoint: {partial}")
    metrics = MetricsLog(run_dir)
    if resumed_step is None:
        for path in [*replaced, *(run_dir / name for name in outputs)]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        metrics.path.unlink(missing_ok=True)
    else:
        metrics.truncate_after(resumed_step)
    return metrics


def save_and_prune(run_dir: Path, step: int, save: Callable[[Path], Path | None], keep_last: int) -> Path | None:
    """`save(checkpoint_dir)` for this step, then keep only the newest `keep_last` (0: all)."""
    path = save(checkpoint_dir(run_dir, step))
    ckpt_io.prune(run_dir, keep_last)
    return path


def write_json(path: Path, value) -> None:
    """A JSON file written atomically (the run's resolved config)."""
    replace_file(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2)))
