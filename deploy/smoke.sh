#!/usr/bin/env bash
# Smoke test of the docker-compose fleet: builds a tiny model inside the scheduler container,
# submits a small GRPO job with the `rlfleet` CLI there, and waits until its steps complete;
# then a multi-turn job (a `task.environment` block: the `retry` environment), whose episodes
# the scheduler plays through the env service, and checks that its steps took turns there.
#
#   docker compose up -d --build --wait && deploy/smoke.sh
#
# Needs a Docker engine with Compose v2 (the project's CI machines have none, so CI checks the
# compose file with `docker-compose config` instead; see tests/deploy/).
# Settings: SMOKE_STEPS (default 3), SMOKE_ENV_STEPS (steps of the multi-turn job, default 2;
# 0 skips it), SMOKE_TIMEOUT_S (default 900, per job), SMOKE_MODEL_DIR (default
# /models/smoke-tiny, in the shared models volume; the multi-turn job uses a copy with a chat
# template, <dir>-chat), COMPOSE (default "docker compose").
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${COMPOSE:-docker compose}
STEPS=${SMOKE_STEPS:-3}
ENV_STEPS=${SMOKE_ENV_STEPS:-2}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-900}
MODEL_DIR=${SMOKE_MODEL_DIR:-/models/smoke-tiny}
CHAT_MODEL_DIR=$MODEL_DIR-chat

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

# submit NAME: submits /tmp/NAME.toml (in the scheduler container) and prints the job id.
submit() {
  local submitted job_id
  submitted=$(in_scheduler rlfleet submit "/tmp/$1.toml" --idempotency-key "$1-$(date +%s)")
  echo "$submitted" >&2
  job_id=$(printf '%s\n' "$submitted" | sed -n 's/.*submitted job \([^ ]*\) .*/\1/p' | head -n1)
  if [ -z "$job_id" ]; then
    echo "smoke: could not read the job id from the CLI output" >&2
    return 1
  fi
  echo "$job_id"
}

# wait_job JOB_ID STEPS: until the job succeeded; fails when it ends otherwise or times out.
wait_job() {
  local job_id=$1 steps=$2 deadline state status step
  echo "== waiting for $steps steps of job $job_id (at most ${TIMEOUT_S}s)"
  deadline=$(( $(date +%s) + TIMEOUT_S ))
  while :; do
    status=$(in_scheduler rlfleet status --json "$job_id")
    state=$(printf '%s\n' "$status" | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' | head -n1)
    step=$(printf '%s\n' "$status" | sed -n 's/.*"current_step": *"\{0,1\}\([0-9]*\)"\{0,1\}.*/\1/p' | head -n1)
    echo "   state=${state:-?} step=${step:-0}/$steps"
    case "$state" in
      succeeded) break ;;
      failed|cancelled)
        printf '%s\n' "$status" >&2
        echo "smoke: job $job_id ended $state" >&2
        $COMPOSE logs --tail 50 scheduler trainer env >&2 || true
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
}

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
job_id=$(submit smoke)
wait_job "$job_id" "$STEPS"
echo "smoke: job $job_id succeeded"

if [ "$ENV_STEPS" -gt 0 ]; then
  echo "== multi-turn: the model with a chat template in $CHAT_MODEL_DIR (once)"
  in_scheduler python - "$MODEL_DIR" "$CHAT_MODEL_DIR" <<'PY'
import json, shutil, sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
if not (out / "config.json").is_file():
    # An assistant turn ends with the end-of-sequence token, as in real chat templates.
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    config = json.loads((tmp / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    tmp.rename(out)
print("model at", out)
PY

  echo "== multi-turn: writing the job spec (task.environment: retry, 2 turns)"
  in_scheduler sh -c 'cat > /tmp/smoke-env.toml' <<SPEC
name = "compose-smoke-env"
steps = $ENV_STEPS
seed = 0

[model]
path = "$CHAT_MODEL_DIR"

[task]
name = "basic_arithmetic"
size = 64
params = { min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }

[task.environment]
name = "retry"
max_turns = 2
options = { max_turns = 2, feedback = "Wrong, once more." }

[sampling]
max_new_tokens = 6

[algorithm]
group_size = 2
prompts_per_step = 2
micro_batch_size = 16
SPEC

  echo "== multi-turn: submitting"
  env_job_id=$(submit smoke-env)
  wait_job "$env_job_id" "$ENV_STEPS"
  # Every step played its episodes in the env service: at least one model turn each.
  in_scheduler python - "$env_job_id" <<'PY'
import json, os, sys, urllib.request

url = f"{os.environ['RLFLEET_URL']}/v1/jobs/{sys.argv[1]}/steps"
with urllib.request.urlopen(url, timeout=10) as resp:
    steps = json.load(resp)["steps"]
turns = [s["metrics"].get("env_turns_mean", 0.0) for s in steps]
print("   env_turns_mean per step:", ", ".join(f"{t:.2f}" for t in turns))
if not turns or min(turns) < 1.0:
    sys.exit("smoke: the multi-turn job's steps did not play episodes in the env service")
PY
  echo "smoke: multi-turn job $env_job_id succeeded through the env service"
fi
echo "smoke: OK"
