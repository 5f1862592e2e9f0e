#!/usr/bin/env bash
# The tests: sets up .venv if needed, then runs pytest (unit tests and the notebooks under nbval).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
