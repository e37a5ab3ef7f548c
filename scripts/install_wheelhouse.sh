#!/usr/bin/env bash
# Install an offline bundle made by scripts/build_wheelhouse.py, with no network.
#
#   scripts/install_wheelhouse.sh BUNDLE [--target DIR]
#
# BUNDLE is the folder build_wheelhouse.py wrote (holding wheels/ or parts/), or a folder
# holding only the parts and their SHA256SUMS (copied there one device call at a time).
# Every part is checked against SHA256SUMS before anything is unpacked.
#
# Wheel bundles: the wheels are checked against MANIFEST.tsv's sha256, then installed into
# the current `python3`'s environment, or unpacked into DIR with --target DIR.
# Site bundles (build_wheelhouse.py --site): the pruned tree is unpacked into DIR
# (--target is required); nothing is installed. Then: export PYTHONPATH=DIR.
set -euo pipefail
bundle=${1:?usage: install_wheelhouse.sh BUNDLE [--target DIR]}
shift
target_dir=""
if [ "${1:-}" = "--target" ]; then target_dir=${2:?--target needs a folder}; fi
PY=${PYTHON:-python3}

if [ -d "$bundle/parts" ]; then parts="$bundle/parts"; else parts="$bundle"; fi
if compgen -G "$parts/*.part-*" >/dev/null; then
  [ -f "$parts/SHA256SUMS" ] || { echo "install_wheelhouse: $parts has parts but no SHA256SUMS" >&2; exit 2; }
  ( cd "$parts" && sha256sum --quiet -c SHA256SUMS ) \
    || { echo "install_wheelhouse: a part in $parts is missing or damaged (copy it again)" >&2; exit 1; }
fi

if compgen -G "$parts/site.tar.xz.part-*" >/dev/null; then
  [ -n "$target_dir" ] || { echo "install_wheelhouse: a site bundle needs --target DIR" >&2; exit 2; }
  mkdir -p "$target_dir"
  # Python's tarfile, not tar -J: the target may lack the xz program, never the lzma module.
  cat "$parts"/site.tar.xz.part-* | "$PY" -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as tar:
    for member in tar:
        if not member.name.startswith("site/") or member.name == "site/":
            continue
        member.name = member.name[len("site/"):]
        tar.extract(member, sys.argv[1], filter="tar")
' "$target_dir"
  echo "install_wheelhouse: unpacked $(ls "$target_dir" | wc -l) top-level entries into $target_dir"
  exit 0
fi

if [ ! -d "$bundle/wheels" ]; then
  compgen -G "$parts/wheelhouse.tar.part-*" >/dev/null \
    || { echo "install_wheelhouse: $bundle has neither wheels/ nor parts" >&2; exit 2; }
  cat "$parts"/wheelhouse.tar.part-* | tar -x -C "$bundle"
fi
( cd "$bundle/wheels" && tail -n +2 ../MANIFEST.tsv | awk -F'\t' '{print $4"  "$3}' | sha256sum --quiet -c - ) \
  || { echo "install_wheelhouse: checksum mismatch in $bundle (rebuild or re-copy the bundle)" >&2; exit 1; }
target=()
if [ -n "$target_dir" ]; then target=(--target "$target_dir"); fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade "${target[@]}" "$bundle"/wheels/*.whl
echo "install_wheelhouse: installed $(ls "$bundle"/wheels/*.whl | wc -l) wheels"
