#!/usr/bin/env bash
# Installs the external tools some tests need, from Debian packages:
#   prometheus      tests/test_prometheus.py runs a real Prometheus against a live run
#   docker-compose  tests/test_deploy.py validates docker-compose.yml (`docker-compose config -q`)
# Idempotent: does nothing when both binaries are on PATH. Installs only as root (a CI container
# or a fresh machine); otherwise it says what is missing and leaves the tests to skip.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-tools: prometheus and docker-compose are present, nothing to do"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-tools: missing ${missing[*]}; not root, installing nothing" \
         "(as root: apt-get install -y --no-install-recommends ${missing[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: missing ${missing[*]} and no apt-get here; installing nothing"
    exit 0
fi

echo "install-test-tools: missing ${missing[*]}; running apt-get update"
apt-get update
# Both packages in one go (already-installed ones are left as they are): one apt-get run.
echo "install-test-tools: apt-get install -y --no-install-recommends prometheus docker-compose"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus docker-compose
echo "install-test-tools: installed: $(prometheus --version 2>&1 | head -n 1); $(docker-compose version --short 2>&1 || true)"
