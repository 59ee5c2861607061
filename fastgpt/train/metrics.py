"""What a run reports: one log line per step, metrics.jsonl, and the loss curve.

Every record is one JSON line in `RUN_DIR/metrics.jsonl` ({"kind": "train" |
"eval", "step", "tokens", ...}); the plot and the tests read the same file.
Floats are written with full precision (json uses repr), so two runs can be
compared bit-for-bit from their logs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import FastGPTError
from ..weights.atomic import replace_file


def step_line(step: int, max_steps: int, loss: float, lr: float, norm: float | None, ms: float,
              tokens_per_second: float, mfu: str) -> str:
    """llm.c-style: step 12/500 | loss 4.1234 | lr 3.0e-04 | norm 0.84 | 143 ms | 7,160 tok/s | MFU 41.2%"""
    norm_text = "n/a" if norm is None else f"{norm:.2f}"
    return (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm_text} | {ms:.0f} ms | "
            f"{tokens_per_second:,.0f} tok/s | {mfu}")


def eval_line(step: int, train_loss: float, val_loss: float) -> str:
    return (f"eval step {step} | train loss {train_loss:.4f} (ppl {perplexity(train_loss):.1f}) | "
            f"val loss {val_loss:.4f} (ppl {perplexity(val_loss):.1f})")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class MetricsLog:
    """Append-only JSONL metrics file for one run directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (from a run that died after its last checkpoint), atomically."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r["step"] <= step]
        replace_file(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            continue
    return records


def plot_losses(run_dir: str | Path) -> Path:
    """Train and val loss against tokens seen -> RUN_DIR/loss.png (matplotlib, no display needed)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FastGPTError(f"--plot: {path} does not exist (not a run directory?)")
    records = read_metrics(path)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise FastGPTError(f"--plot: {path} has no loss records yet")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="train (per step)")
    if evals:
        tokens = [r["tokens"] for r in evals]
        ax.plot(tokens, [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot(tokens, [r["val_loss"] for r in evals], "s-", label="val (eval)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    replace_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
