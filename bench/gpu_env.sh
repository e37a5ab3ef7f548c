# Sourced by bench/gpu_call*.sh (bench/GPU_RUNBOOK.md): the repo root, $OUT, the interpreter,
# and the settings of a device call or of its CPU rehearsal (--dry-run, the first argument).
#
# Device (through the device tool's run): $OUT is the folder that comes back; python3 is the
#   machine's (torch 2.11, timm); the bundle's parts are staged in /tmp/wh and unpacked into /tmp/site.
# --dry-run (here, on the CPU): the same scripts and suite code path at toy sizes (--device cpu
#   --quick); bench/device_sim blocks every import the machine could not satisfy (what the bundle
#   brings comes from the unpacked rehearsal bundle only); $OUT defaults to a new temp folder;
#   the bundle is $SMAE_BUNDLE (a `build_wheelhouse.py --site --python-version 3.11` output here).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d /tmp/smae-gpu-dry-XXXXXX)}
  BUNDLE=${SMAE_BUNDLE:-$REPO/.wheelhouse}
  WH=${SMAE_WH:-/tmp/smae-gpu-dry-wh}
  SITE=${SMAE_SITE:-/tmp/smae-gpu-dry-site}
  SITE_TIMM=$OUT/site-timm
  export PYTHONPATH=$REPO/bench/device_sim:$REPO
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  SUITE=(--device cpu --quick)   # toy sizes: QUICK in gpu_suite.py
  # Appended after each call's own budget (argparse keeps the last): a shared, loaded CPU needs
  # minutes where the H200 needs seconds (DALI's workers each import torch and DALI).
  SLOW=(--budget-s 1800 --model-timeout 600 --e2e-timeout 900 --loader-timeout 600 --tests-timeout 600)
  SIZES=()                       # QUICK's (tiny)
  BIG_BATCH=8
  L_SIZE=tiny
else
  : "${OUT:?OUT is unset: run this through the device tool, or rehearse it here with --dry-run}"
  BUNDLE=$REPO/.wheelhouse
  WH=/tmp/wh
  SITE=/tmp/site
  SITE_TIMM=/tmp/site-timm
  export PYTHONPATH=$REPO
  SUITE=()
  SLOW=()
  SIZES=(--sizes base large)
  BIG_BATCH=512
  L_SIZE=large
fi
mkdir -p "$OUT"
RESULTS=${SMAE_RESULTS:-/tmp/smae-gpu-results}   # per-measurement JSONs; what comes back is $OUT/*.jsonl

# This environment's timm, when carried as .whl/timm-*.whl: the models need timm.layers.attention
# (timm 1.0.x, recent), and the machine's timm version is not recorded anywhere. Call it as
# `use_carried_timm > >(tee -a LOG) 2>&1`, never in a pipeline: the PYTHONPATH it exports must
# reach the calling shell.
use_carried_timm() {
  local whl
  whl=$(ls "$REPO"/.whl/timm-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE_TIMM" "$whl" || return 1
    export PYTHONPATH=$SITE_TIMM:$PYTHONPATH
    echo "[call] timm from $whl"
  fi
  "$PY" -c "import timm, timm.layers.attention; print('[call] timm', timm.__version__, timm.__file__)"
}

# The machine (or this CPU) and the versions, for the report.
write_env() {
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    nproc; free -g | head -2; df -h /tmp | tail -1
  } > "$OUT/$1" 2>&1
}
