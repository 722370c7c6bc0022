#!/usr/bin/env bash
# Install the Debian packages the tests use as real parts, once: a Prometheus pushgateway (metric
# tests) and headless Chromium (the HTML report). Idempotent: nothing happens when both are present.
set -euo pipefail
PACKAGES="prometheus-pushgateway chromium"
missing=""
for cmd in $PACKAGES; do command -v "$cmd" >/dev/null || missing="$missing $cmd"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else
    echo "make test needs the Debian packages:$missing; install them with: sudo apt-get install -y$missing" >&2
    exit 1
fi
echo "installing Debian packages:$missing"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
