#!/usr/bin/env bash
# The main job on the bundled real images: install (first run only), pack the
# images into Zarr shards and verify them. Outputs go to demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
OUT=${SMAE_DEMO_OUT:-demo_out}
.venv/bin/smae-pack assets/neon --out "$OUT/data" --workers 2 --report "$OUT/pack_report.json"
.venv/bin/smae-pack verify "$OUT/data"
echo "[demo] shards: $OUT/data   report: $OUT/pack_report.json"
