#!/usr/bin/env bash
# Set up mlxserve with its test dependencies and run the whole test suite; on Linux, then run the
# tests whose numbers go through the CPU path again with the gemv shim off (its fallback must give
# the same tokens). Extra arguments go to pytest, and then only that run happens.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
if [ "$(uname -s)" = "Linux" ]; then
  echo "The CPU path's tests again, with the gemv shim off (MLXSERVE_BLAS_SHIM=off):"
  MLXSERVE_BLAS_SHIM=off .venv/bin/python -m pytest -q tests/test_blas.py tests/api/test_concurrency.py \
    tests/engine/test_gguf_smollm2.py
fi
