#!/usr/bin/env bash
# Regenerates the gRPC stubs from proto/ into services/rlfleet/v1/.
# The generator is pinned through grpcio-tools in pyproject.toml; a test
# (tests/unit/common/test_proto_current.py) fails when the committed stubs are stale.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/services}
python=${PYTHON:-$root/.venv/bin/python}
"$python" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/proto/rlfleet/v1/*.proto
touch "$out/rlfleet/v1/__init__.py"
