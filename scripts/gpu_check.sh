#!/usr/bin/env bash
# The GPU check in one call: the gpu-check profile (4-bit QLoRA training, bf16 evaluation, the teacher
# behind transformers serve on 127.0.0.1) from local weights only, then a table of each stage's wall
# time, peak memory and peak GPU memory. Needs a CUDA GPU and an environment with the locked packages
# (.venv, or $PYTHON); reaches no network. Extra arguments go to the pipeline (-p KEY=VALUE ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-.venv/bin/python}"
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $py (torch.cuda.is_available() is False): run it on a CUDA machine" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # local weights only
"$py" -m fclib.pipeline --profile gpu-check "$@"
"$py" - <<'PY'
import json
from fclib.runs import run_folder

run = run_folder("gpu-check", create=False)
read = lambda name: json.loads((run / name).read_text()) if (run / name).is_file() else {}
times, memory, gpu = read("timings.json"), read("memory.json"), read("gpu_memory.json")
print("| stage | wall time (s) | peak memory (GiB) | peak GPU memory (GiB) |\n|---|---|---|---|")
for stage, seconds in times.items():
    print(f"| {stage} | {seconds:.0f} | {memory.get(stage, 0):.2f} | {gpu.get(stage, 'n/a')} |")
print(f"| all | {sum(times.values()):.0f} | {max(memory.values(), default=0):.2f} | {max(gpu.values(), default='n/a')} |")
PY
