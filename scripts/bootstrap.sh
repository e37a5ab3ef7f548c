#!/usr/bin/env bash
# Create .venv in the repository root with the pinned dependencies and the
# project installed in editable mode. Idempotent: reinstalls only when the
# requirement files or setup.py change. Needs python3 (>= 3.11: tomllib, numpy 2.4) with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (tomllib, numpy 2.4), found " + sys.version.split()[0])'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.smae-installed
want=$(cat requirements/*.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing pinned dependencies into .venv (first time: several minutes)"
  pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
  "${pip[@]}" -r requirements/torch.txt
  "${pip[@]}" -r requirements/base.txt
  "${pip[@]}" --no-build-isolation -r requirements/deepspeed.txt
  "${pip[@]}" --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
