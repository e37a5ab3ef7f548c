#!/usr/bin/env bash
# Device calls 2 .. K-1 of bench/GPU_RUNBOOK.md: stage one part of the wheel bundle on the machine.
# The part travels in `carry` (64 MiB a call, the working tree included); it is copied into
# $WH (/tmp/wh) by name, so a retried call cannot duplicate bytes, and checked against SHA256SUMS.
# The listing shows every part staged so far: a part missing from it means the machine was
# recycled between calls (idle > 30 s), and staging starts again at part 00.
#
#   device: run  command="bash bench/gpu_call_part.sh NN"
#                carry=[".wheelhouse/parts/site.tar.xz.part-NN", ".wheelhouse/parts/SHA256SUMS"]  timeout_s=60
#   here:   SMAE_BUNDLE=DIR bash bench/gpu_call_part.sh --dry-run NN
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
[ "$DRY" = 1 ] && shift
nn=${1:?usage: gpu_call_part.sh [--dry-run] NN}
part=site.tar.xz.part-$nn
mkdir -p "$WH"
cp "$BUNDLE/parts/$part" "$BUNDLE/parts/SHA256SUMS" "$WH/" || { echo "[part] $BUNDLE/parts/$part: not carried" >&2; exit 2; }
( cd "$WH" && grep " $part\$" SHA256SUMS | sha256sum -c - ) || { echo "[part] $part: damaged in transit" >&2; exit 1; }
ls -l "$WH" | tee "$OUT/staged-$nn.txt"
