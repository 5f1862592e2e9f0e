#!/usr/bin/env bash
# The whole study on the embedded default (offline, CPU): sets up .venv if needed, then runs the
# pipeline's cpu profile. Extra arguments go to the pipeline, e.g. ./study.sh --profile smoke
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
exec .venv/bin/python -m fclib.pipeline --profile cpu "$@"
