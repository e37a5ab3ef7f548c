#!/usr/bin/env bash
# The last device call of bench/GPU_RUNBOOK.md: stage the last part of the bundle, unpack it,
# then the measurements that need DALI, zarr and DeepSpeed, most valuable first:
#   e2e ViT-B selectivemae (shards -> DALI mixed decode -> DeepSpeed ZeRO-2 bf16), loader-only
#   mixed decode, the ViT-L micro-batch 1024 memory under ZeRO-2, pytest -m gpu on the pipeline.
# Every record is appended to $OUT/results-last.jsonl the moment it exists.
#
#   device: run  command="bash bench/gpu_call_last.sh NN"
#                carry=[".wheelhouse/parts/site.tar.xz.part-NN", ".wheelhouse/parts/SHA256SUMS", ".whl"]
#                timeout_s=380
#   here:   SMAE_BUNDLE=DIR bash bench/gpu_call_last.sh --dry-run NN
set -uo pipefail
here=$(dirname "$0")
bash "$here/gpu_call_part.sh" "$@" || exit $?
source "$here/gpu_env.sh" "$@"
log=$OUT/call-last.log
write_env env-call-last.txt
# Every part, not only this call's, against SHA256SUMS: one missing means the machine was recycled.
( cd "$WH" && sha256sum -c SHA256SUMS ) 2>&1 | tee -a "$log" \
  || { echo "[last] a part is missing: the machine was recycled; stage again from part 00" | tee -a "$log"; exit 4; }
rm -rf "$SITE"
start=$(date +%s)
bash "$REPO/scripts/install_wheelhouse.sh" "$WH" --target "$SITE" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 5
echo "[last] bundle unpacked in $(( $(date +%s) - start )) s" | tee -a "$log"
export PYTHONPATH=$PYTHONPATH:$SITE
[ "$DRY" = 1 ] && export SMAE_DEVICE_SIM_SITE=$SITE
use_carried_timm > >(tee -a "$log") 2>&1 || exit 3
"$PY" -c "import deepspeed, nvidia.dali, zarr, numcodecs, google_crc32c
from selectivemae_ds.data.pipeline import InputPipeline
from selectivemae_ds.benchmark.model import versions
print('[last] imports ok', versions())" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 6
"$PY" bench/gpu_suite.py "${SUITE[@]}" --out "$RESULTS" --jsonl "$OUT/results-last.jsonl" \
  --only e2e loader memory tests-data --budget-s 300 "${SLOW[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
cp "$RESULTS/SUMMARY.md" "$OUT/SUMMARY-last.md" 2>/dev/null
echo "[last] done, suite exit $rc; results in $OUT"
exit "$rc"
