#!/usr/bin/env bash
# Set up mlxserve and serve the default models on http://127.0.0.1:1234/v1.
# Extra arguments go to `mlxserve serve` (see `mlxserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/mlxserve serve "$@"
