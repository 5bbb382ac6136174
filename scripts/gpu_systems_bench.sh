#!/usr/bin/env bash
# Every GPU measurement of the assignment-2 benchmarking harness (docs/benchmarks.md), by stage:
#
#   bash scripts/gpu_systems_bench.sh [stage ...]      (default: every stage, in this order)
#
#   mixed      cs336-systems mixed-precision (fp16 autocast on the GPU)
#   eager      model sizes x {fp32, bf16}, eager, context 512, batch 4: fwd / bwd / optimizer step
#   compiled   small .. 2.7B x {bf16, fp32}, each block torch.compile'd (compile time is costly: use STAGE_DEADLINE)
#   profile    small, bf16 and fp32: torch.profiler top kernels (+ NVTX ranges)
#   memory     2.7B at contexts 128/256/512 x {fp32, bf16} x {forward, train}: peaks + timelines
#   attention  naive vs compiled vs SDPA (vs our FlashAttention), seq 256..16384 x d 16..128
#
#   eager, memory, attention, compiled, profile is also the order of importance: the default order.
#
# Runs from a plain checkout with the machine's python3 (PYTHONPATH, no install). Results go to
# $RUN_DIR (default runs/gpu_systems); with $OUT set (the device tool), a results.tgz of the
# tables, JSON and PNGs (no snapshots or traces: too large) and the log are left there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/assignment1:$PWD/assignment2${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RUN=${RUN_DIR:-runs/gpu_systems}
mkdir -p "$RUN"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(mixed eager memory attention compiled profile)
# STAGE_DEADLINE=N: no stage runs past N seconds after the start (a stage cut short keeps the
# rows it finished: the benchmark rewrites its JSON after every row)
deadline=${STAGE_DEADLINE:-0}
bench() { "${limit[@]}" $PY -m cs336_systems.cli benchmark "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
for stage in "${stages[@]}"; do
  start=$SECONDS
  limit=()
  if [ "$deadline" -gt 0 ]; then
    [ $((deadline - SECONDS)) -le 5 ] && { echo "=== $stage: skipped (deadline)"; continue; }
    limit=(timeout $((deadline - SECONDS)))
  fi
  echo "=== $stage"
  case $stage in
    mixed) "${limit[@]}" $PY -m cs336_systems.cli mixed-precision --json "$RUN/mixed/mixed_precision.json" ;;
    eager) bench --size small medium large xl 2.7B --dtype fp32 bf16 --context-length 512 \
             --batch-size 4 --warmup 2 --steps 3 --out "$RUN/eager" ;;
    compiled) bench --size small medium large xl 2.7B --dtype bf16 fp32 --compile blocks --context-length 512 \
                --batch-size 4 --warmup 2 --steps 3 --out "$RUN/compiled" ;;
    profile) bench --size small --dtype bf16 fp32 --context-length 512 --warmup 2 --steps 3 \
               --profile --nvtx --out "$RUN/profile" ;;
    memory) bench --size 2.7B --context-length 128 256 512 --dtype fp32 bf16 --mode forward train \
              --batch-size 4 --warmup 1 --steps 2 --memory --out "$RUN/memory" ;;
    attention) "${limit[@]}" $PY -m cs336_systems.cli attention-bench --warmup 2 --steps 5 --out "$RUN/attention" ;;
    *) echo "unknown stage $stage (mixed eager compiled profile memory attention)" >&2; exit 2 ;;
  esac 2>&1 | tee "$RUN/$stage.log"
  echo "=== $stage: $((SECONDS - start)) s"
done
if [ -n "${OUT:-}" ]; then
  (cd "$RUN" && find . \( -name '*.json' ! -name 'trace_*' -o -name '*.png' -o -name '*.md' -o -name '*.log' \) \
     -print0 | tar czf "$OUT/results.tgz" --null -T -)
  ls -la "$OUT"
fi
