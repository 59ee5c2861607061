"""Greedy generation at batch 1: fastgpt vs transformers, with the memory-bandwidth bound.

    python3 benchmarks/bench_generate.py --sizes gpt2 --new-tokens 256 --threads 1 2

Writes benchmarks/results/generate.csv (appended) and generate.md (replaced); see fastgpt/bench/generate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastgpt.bench.generate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
