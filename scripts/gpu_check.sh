#!/usr/bin/env bash
# The GPU checks: on a machine with one CUDA GPU, runs every test marked `gpu` and prints
# a PASS/FAIL line for each, then a summary; exits non-zero when one fails or none ran.
# Under 8 minutes on one H100/H200. What it covers:
#   - FSDP2 over NCCL with one rank, plain and with CPU offload (tests/unit/trainer/test_trainer_cuda.py)
#   - bf16 compute with fp32 master weights on CUDA (same file)
#   - chunked log-probs on CUDA: values and peak memory against full logits (same file)
#   - the CUDA PyTorch rollout engine: the shared engine suite (tests/unit/rollout/test_torch_engine_cuda.py)
#   - the weight group's GPU paths (tests/unit/common/test_weight_group_cuda.py): staging
#     through a GPU bucket (gloo on CUDA tensors, one GPU); an nccl group trainer → replica
#     and a replica killed mid-version (two GPUs or more: NCCL refuses two ranks on one
#     device, so one GPU prints these as SKIP); a CUDA replica joining an nccl group
# vLLM's CUDA wheel is not installed by this script (too large to carry to a lent machine).
#
#   scripts/gpu_check.sh            # uses .venv (scripts/install.sh) or $PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
"$python" - <<'PY' || { echo "FAIL: no CUDA device visible to torch"; exit 1; }
import torch, sys
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
sys.exit(0 if torch.cuda.is_available() else 1)
PY
report=$(mktemp)
timeout 480 "$python" -m pytest -m gpu -rA -q -p no:cacheprovider \
  tests/unit/trainer/test_trainer_cuda.py tests/unit/rollout/test_torch_engine_cuda.py \
  tests/unit/common/test_weight_group_cuda.py \
  > "$report" 2>&1
status=$?
grep -E '^(PASSED|FAILED|ERROR|SKIPPED)' "$report" | sed -E 's/^PASSED/PASS/; s/^(FAILED|ERROR)/FAIL/; s/^SKIPPED/SKIP/'
tail -n 1 "$report"
passed=$(grep -c '^PASSED' "$report")
if [ "$status" -ne 0 ] || [ "$passed" -eq 0 ]; then
  echo "gpu_check: FAILED (pytest status $status; full output: $report)"
  exit 1
fi
echo "gpu_check: all $passed GPU tests passed"
