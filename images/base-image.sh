#!/usr/bin/env bash
# A Python 3.11 base image from Debian packages alone, for sites that mirror Debian but cannot pull
# Docker Hub (air-gapped clusters; this project's CI). Equivalent to python:3.11-slim-bookworm for
# images/Dockerfile: Debian bookworm's python3 (3.11) with pip and venv, `python` and `pip` on PATH,
# plus the C compiler and Python headers that torch.compile (Inductor, Triton) needs at run time.
#
#   images/base-image.sh [TAG]        default TAG: pneumonia-kfp-base:3.11-bookworm
#   DEBIAN_MIRROR=http://mirror.example/debian   the Debian mirror (default: deb.debian.org)
#   CA_BUNDLE=/path/ca.crt   trusted by pip in the image (default: this machine's bundle, so a TLS proxy works)
#   FORCE=1                  rebuild even when TAG exists
# Needs root (debootstrap), debootstrap and a running Docker engine.
set -euo pipefail
TAG=${1:-pneumonia-kfp-base:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKER=${DOCKER:-docker}

if [ -z "${FORCE:-}" ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing; install it: apt-get install debootstrap" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root; run it as root (or with sudo)" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/pneumonia-kfp-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $MIRROR into $root"
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python3-dev,ca-certificates,gcc,g++,libc6-dev \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# pip may install into the system Python, as in the official image (the image is this one program's)
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 "$root/usr/bin/python"
ln -sf pip3 "$root/usr/bin/pip"
[ -f "$CA_BUNDLE" ] && cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
# what a container never needs: package caches, lists, docs
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*

tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "base image $TAG: $("$DOCKER" run --rm --network host "$TAG" python --version)"
