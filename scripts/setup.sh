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

# Linux: MLX's CPU backend is 2-3x faster with OpenBLAS under it, and decodes faster still with the
# C shim that mlxserve compiles in front of it (mlxserve/blas.py): install what is missing.
apt_install() { # package, what it is for
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "Installing $1 for $2…" >&2
    (apt-get install -y -qq "$1" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null 2>&1; }) ||
      echo "Could not install $1; continuing without it (slower on CPU)." >&2
  else
    echo "Tip: install $1 (Debian/Ubuntu: sudo apt-get install $1) for $2." >&2
  fi
}
if [ "$(uname -s)" = "Linux" ]; then
  ldconfig -p 2>/dev/null | grep -q libopenblas || apt_install libopenblas0-pthread "faster CPU inference"
  command -v cc >/dev/null || command -v gcc >/dev/null || apt_install gcc "faster CPU decoding"
fi

extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
fi
echo "Installing mlxserve${extras} into .venv…" >&2
.venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".${extras}"
