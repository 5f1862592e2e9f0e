#!/usr/bin/env bash
# The whole study on the embedded default (offline, CPU): sets up .venv if needed, then runs the
# pipeline's cpu profile. Extra arguments go to the pipeline, e.g. ./study.sh --profile workshop
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: ./study.sh [--profile NAME] [--run-name NAME] [--from NN] [--to NN] [-p KEY=VALUE ...]

Runs the study's notebooks 01-05 with papermill into outputs/<run_name>/ and writes report.md there.
The first call sets up .venv (pinned packages, the embedded model: a few minutes).

  --profile NAME   profiles/NAME.yaml, measured on 2 cores (README, "Measured"): cpu (default,
                   13-15 min, 5.5 GiB), workshop (7-10 min, 3.5 GiB), smoke (about 2 min,
                   tiny random models: checks the plumbing), paper (GPU and a teacher endpoint)
  --run-name NAME  folder under outputs/ (default: the profile's run_name)
  --from NN        start at notebook NN, reusing the run's earlier results
  --to NN          stop after notebook NN
  -p KEY=VALUE     override one parameter of the profile (typed like YAML: 3, 0.5, true, text)

A run whose models and data are all local (embedded, tiny, folders, the shipped GSM8K) or in the
hub cache runs offline; one that names a hub id fetches it, and stops at once, saying what it could
not fetch and how to give a local folder instead, when the hub cannot be reached.
USAGE
    exit 0 ;;
esac
scripts/setup.sh
exec .venv/bin/python -m fclib.pipeline --profile cpu "$@"
