#!/usr/bin/env bash
# Pack on N SLURM nodes: an array of N part jobs, then a merge job that runs only if all
# of them succeed.
#   launcher/pack_slurm.sh N OUT SRC [SRC ...] [smae-pack options]
#   launcher/pack_slurm.sh 16 /shared/rs13m /shared/OpticalRS-13M.zip --images-per-shard 4096
# Run it from the checkout (the jobs use its .venv, or SMAE_PACK). Partition, account and
# the like come from sbatch's own environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT,
# ...). CPUS_PER_PART overrides pack_array.sbatch's --cpus-per-task (32), the worker count of
# each part. LOG_DIR (default .) receives the jobs' logs and JSON reports.
set -euo pipefail
N=${1:?usage: pack_slurm.sh N OUT SRC [SRC ...] [smae-pack options]}
OUT=${2:?usage: pack_slurm.sh N OUT SRC [SRC ...] [smae-pack options]}
shift 2
[ $# -gt 0 ] || { echo "pack_slurm.sh: no SRC given" >&2; exit 2; }
LOG_DIR=${LOG_DIR:-.}
export REPORT_DIR=${REPORT_DIR:-$LOG_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
parts=$(sbatch --parsable --array="0-$((N - 1))" --output="$LOG_DIR/smae-pack-%A_%a.out" \
  ${CPUS_PER_PART:+--cpus-per-task="$CPUS_PER_PART"} \
  "$HERE/pack_array.sbatch" "$OUT" "$@")
parts=${parts%%;*}
merge=$(sbatch --parsable --dependency="afterok:$parts" --kill-on-invalid-dep=yes \
  --output="$LOG_DIR/smae-pack-merge-%j.out" "$HERE/pack_merge.sbatch" "$OUT")
merge=${merge%%;*}
echo "parts: job $parts (array 0-$((N - 1))); merge: job $merge (runs after every part succeeds)"
