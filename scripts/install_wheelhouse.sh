#!/usr/bin/env bash
# Install an offline bundle made by scripts/build_wheelhouse.py, with no network.
#
#   scripts/install_wheelhouse.sh BUNDLE [--target DIR]
#
# BUNDLE is the folder build_wheelhouse.py wrote (holding wheels/ or parts/).
# Parts are joined and checked against MANIFEST.tsv's sha256 before anything is
# installed. Without --target the wheels go into the current `python3`'s
# environment (a venv that already has a CUDA PyTorch); with --target DIR they are
# unpacked there (then: export PYTHONPATH=DIR).
set -euo pipefail
bundle=${1:?usage: install_wheelhouse.sh BUNDLE [--target DIR]}
shift
target=()
if [ "${1:-}" = "--target" ]; then target=(--target "${2:?--target needs a folder}"); fi
PY=${PYTHON:-python3}
if [ ! -d "$bundle/wheels" ]; then
  [ -d "$bundle/parts" ] || { echo "install_wheelhouse: $bundle has neither wheels/ nor parts/" >&2; exit 2; }
  cat "$bundle"/parts/wheelhouse.tar.part-* | tar -x -C "$bundle"
fi
( cd "$bundle/wheels" && tail -n +2 ../MANIFEST.tsv | awk -F'\t' '{print $4"  "$3}' | sha256sum --quiet -c - ) \
  || { echo "install_wheelhouse: checksum mismatch in $bundle (rebuild or re-copy the bundle)" >&2; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade "${target[@]}" "$bundle"/wheels/*.whl
echo "install_wheelhouse: installed $(ls "$bundle"/wheels/*.whl | wc -l) wheels"
