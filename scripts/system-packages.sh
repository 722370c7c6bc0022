#!/usr/bin/env bash
# Install the Debian packages the tests use as real parts, once: a Prometheus pushgateway (metric tests),
# headless Chromium (the HTML report), the Docker engine and debootstrap (the image, its Debian base, and
# the pipeline run in containers). Idempotent: nothing happens when every command is present.
set -euo pipefail
# package:command
PACKAGES="prometheus-pushgateway:prometheus-pushgateway chromium:chromium docker.io:dockerd debootstrap:debootstrap"
missing=""
for entry in $PACKAGES; do command -v "${entry#*:}" >/dev/null || missing="$missing ${entry%%:*}"; done
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
