#!/usr/bin/env bash
# One bounded GPU session: the self-check first, then BENCHMARKS.md's list in priority order,
# each command started only while enough of the budget is left (a lent machine is short-lived).
#
#   bash benchmarks/gpu_session.sh [OUT_DIR] [BUDGET_SECONDS]
#
# Everything lands in OUT_DIR: session.log (all output) and bench.tar.gz (the --json files).
set -u
OUT_DIR=${1:-bench}
BUDGET=${2:-420}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR/json"
LOG="$OUT_DIR/session.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NEED LIMIT CMD...: run CMD when at least NEED seconds are left, killed after LIMIT seconds
run() {
    local need=$1 limit=$2; shift 2
    if (( $(left) < need )); then
        echo "### SKIPPED (budget: $(left) s left, needs $need): $*" | tee -a "$LOG"
        return
    fi
    echo "### $(date -u +%H:%M:%S) $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    echo "### exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, timm, sys; print('torch', torch.__version__, 'timm', timm.__version__, 'python', sys.version.split()[0], 'cuda', torch.version.cuda)"
} | tee -a "$LOG"

run 60 200 $PY benchmarks/gpu_check.py
J="$OUT_DIR/json"
for bs in 32 64 128; do
    run 40 90 $PY benchmarks/bench_train.py --model_size base --batch_size $bs --json "$J/base_bs${bs}_bf16.json"
done
run 90 150 $PY benchmarks/bench_train.py --model_size base --batch_size 64 --compile --json "$J/base_bs64_bf16_compile.json"
run 40 90 $PY benchmarks/bench_train.py --model_size base --batch_size 32 --no_color_jitter --json "$J/base_bs32_bf16_nojitter.json"
for size in tiny small; do
    run 40 90 $PY benchmarks/bench_train.py --model_size $size --batch_size 64 --json "$J/${size}_bs64_bf16.json"
done
run 40 90 $PY benchmarks/bench_train.py --model_size base --batch_size 64 --no_amp --json "$J/base_bs64_fp32.json"
run 90 150 $PY benchmarks/bench_train.py --model_size base --batch_size 128 --compile --json "$J/base_bs128_bf16_compile.json"
tar -czf "$OUT_DIR/bench.tar.gz" -C "$OUT_DIR" json
echo "### session done after $(( $(date +%s) - START )) s" | tee -a "$LOG"
grep -E '^(PASS|FAIL|SKIP)|PASS|FAIL|patches/s|MISSED|MET|^###' "$LOG" | tail -80
