#!/usr/bin/env bash
# Device call 1 of bench/GPU_RUNBOOK.md: the model-only measurements and the model's CUDA tests.
# Needs only what the machine has (torch, timm): selectivemae / mae / crossmae at ViT-B and ViT-L,
# bf16, batch 256 (img/s, MFU, HOG+PSTS share, peak memory), pytest -m gpu tests/test_gpu_model.py,
# then, while the budget lasts, selectivemae and mae at ViT-L with batch 512 (MFU at a larger batch).
# Every record is appended to $OUT/results.jsonl the moment it exists.
#
#   device: run  command="bash bench/gpu_call1.sh"  carry=[".whl"]  timeout_s=270
#   here:   bash bench/gpu_call1.sh --dry-run       (CPU rehearsal; prints where its $OUT is)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
log=$OUT/call1.log
write_env env-call1.txt
use_carried_timm > >(tee -a "$log") 2>&1 || exit 3
# 6 model runs (~20 s each on the H200, mostly process start) + the model tests (~40 s).
"$PY" bench/gpu_suite.py "${SUITE[@]}" "${SIZES[@]}" --out "$RESULTS" --jsonl "$OUT/results.jsonl" \
  --only model tests-model --budget-s 180 "${SLOW[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
"$PY" bench/gpu_suite.py "${SUITE[@]}" --out "$RESULTS" --jsonl "$OUT/results.jsonl" --only model \
  --methods selectivemae mae --sizes "$L_SIZE" --model-batch "$BIG_BATCH" --budget-s 45 "${SLOW[@]}" 2>&1 | tee -a "$log"
cp "$RESULTS/SUMMARY.md" "$OUT/SUMMARY-call1.md" 2>/dev/null
echo "[call1] done, suite exit $rc; results in $OUT"
exit "$rc"
