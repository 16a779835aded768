#!/usr/bin/env bash
# Create .venv (if missing) and install mlxserve into it; `--test` adds the test dependencies.
# Used by serve.sh and test.sh so that both README commands work on a fresh Linux or macOS machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "mlxserve needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$PYTHON" --version)…" >&2
  "$PYTHON" -m venv .venv
fi

# Linux: MLX's CPU backend is 2-3x faster with OpenBLAS under it (mlxserve/blas.py).
if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "Installing OpenBLAS (libopenblas0-pthread) for faster CPU inference…" >&2
    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; }) ||
      echo "Could not install OpenBLAS; continuing without it (slower on CPU)." >&2
  else
    echo "Tip: install OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread) for faster CPU inference." >&2
  fi
fi

extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
fi
echo "Installing mlxserve${extras} into .venv…" >&2
.venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".${extras}"
