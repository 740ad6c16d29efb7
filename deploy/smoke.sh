#!/usr/bin/env bash
# Smoke test of the docker-compose fleet: builds a tiny model inside the scheduler container,
# submits a small GRPO job with the `rlfleet` CLI there, and waits until its steps complete.
#
#   docker compose up -d --build --wait && deploy/smoke.sh
#
# Needs a Docker engine with Compose v2 (the project's CI machines have none, so CI checks the
# compose file with `docker-compose config` instead; see tests/deploy/).
# Settings: SMOKE_STEPS (default 3), SMOKE_TIMEOUT_S (default 900), SMOKE_MODEL_DIR (default
# /models/smoke-tiny, in the shared models volume), COMPOSE (default "docker compose").
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${COMPOSE:-docker compose}
STEPS=${SMOKE_STEPS:-3}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-900}
MODEL_DIR=${SMOKE_MODEL_DIR:-/models/smoke-tiny}

# -T: no TTY, so the CLI prints plain text; a wide COLUMNS keeps rich from wrapping lines.
in_scheduler() { $COMPOSE exec -T -e COLUMNS=240 scheduler "$@"; }

echo "== starting the fleet (no-op when it is already up) and waiting for health"
$COMPOSE up -d --wait

echo "== building a tiny model in $MODEL_DIR (once)"
in_scheduler python -c "
from pathlib import Path
from rlfleet.common.tinymodel import build_tiny_model
out = Path('$MODEL_DIR')
if not (out / 'config.json').is_file():
    build_tiny_model(out, seed=0)
print('model at', out)
"

echo "== writing the job spec"
in_scheduler sh -c 'cat > /tmp/smoke.toml' <<SPEC
name = "compose-smoke"
steps = $STEPS
seed = 0

[model]
path = "$MODEL_DIR"

[task]
name = "basic_arithmetic"
size = 64
params = { min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }

[sampling]
max_new_tokens = 8

[algorithm]
group_size = 4
prompts_per_step = 4
micro_batch_size = 16
SPEC

echo "== submitting"
submitted=$(in_scheduler rlfleet submit /tmp/smoke.toml --idempotency-key "smoke-$(date +%s)")
echo "$submitted"
job_id=$(printf '%s\n' "$submitted" | sed -n 's/.*submitted job \([^ ]*\) .*/\1/p' | head -n1)
if [ -z "$job_id" ]; then
  echo "smoke: could not read the job id from the CLI output" >&2
  exit 1
fi

echo "== waiting for $STEPS steps of job $job_id (at most ${TIMEOUT_S}s)"
deadline=$(( $(date +%s) + TIMEOUT_S ))
state=""
while :; do
  status=$(in_scheduler rlfleet status --json "$job_id")
  state=$(printf '%s\n' "$status" | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' | head -n1)
  step=$(printf '%s\n' "$status" | sed -n 's/.*"current_step": *"\{0,1\}\([0-9]*\)"\{0,1\}.*/\1/p' | head -n1)
  echo "   state=${state:-?} step=${step:-0}/$STEPS"
  case "$state" in
    succeeded) break ;;
    failed|cancelled)
      printf '%s\n' "$status" >&2
      echo "smoke: job $job_id ended $state" >&2
      $COMPOSE logs --tail 50 scheduler trainer >&2 || true
      exit 1 ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "smoke: job $job_id did not finish within ${TIMEOUT_S}s" >&2
    $COMPOSE logs --tail 50 >&2 || true
    exit 1
  fi
  sleep 5
done

echo "== step history"
in_scheduler rlfleet logs "$job_id"
echo "smoke: OK (job $job_id succeeded)"
