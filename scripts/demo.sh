#!/usr/bin/env bash
# The main job on the bundled real images: install (first run only), pack the
# images into Zarr shards and verify them, then pretrain the demo SelectiveMAE
# (ViT-tiny, 64 px, 8 steps) through the deepspeed launcher on 2 CPU ranks,
# writing a sharded checkpoint and TensorBoard logs. Outputs go to demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
OUT=${SMAE_DEMO_OUT:-demo_out}
RANKS=${SMAE_DEMO_RANKS:-2}
.venv/bin/smae-pack assets/neon --out "$OUT/data" --workers 2 --report "$OUT/pack_report.json"
.venv/bin/smae-pack verify "$OUT/data"
echo "[demo] shards: $OUT/data   report: $OUT/pack_report.json"

# A fresh run each time: the demo config does not resume.
rm -rf "$OUT/run"
# A free port, so the demo does not collide with another job on the default 29500.
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/deepspeed --num_gpus "$RANKS" --master_port "$PORT" launcher/pretrain.py \
    --config configs/demo.toml --deepspeed_config ds_configs/cpu_smoke.json \
    --set data.path="$OUT/data" --set run_dir="$OUT/run"
echo "[demo] run: $OUT/run   checkpoints: $OUT/run/checkpoints   tensorboard: tensorboard --logdir $OUT/run/tensorboard"
