#!/usr/bin/env bash
# Build images/Dockerfile as IMAGE with a BuildKit builder this machine has, and say which one:
#   1. `docker buildx build --load` (Docker 23 and newer, with the buildx plugin), or
#   2. a docker CLI with BuildKit built in (before 23: Debian 12's docker.io 20.10), DOCKER_BUILDKIT=1.
# The Dockerfile needs BuildKit (RUN --mount) but no frontend image, so neither pulls anything for it.
#
#   images/build.sh IMAGE          BASE_IMAGE=... (default: the Dockerfile's python:3.11 slim)
#                                  PYTHON=...     (the project's Python: it computes the source label)
set -euo pipefail
IMAGE=${1:?usage: images/build.sh IMAGE}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

builder=() about=""
# the CLIs to try, in order (Debian's docker.io CLI sits in /usr/bin, often behind a newer one on PATH)
for cli in ${DOCKER_CLIS:-docker /usr/bin/docker}; do
    command -v "$cli" >/dev/null || continue
    if ! "$cli" version --format '{{.Server.Version}}' >/dev/null 2>&1; then
        echo "make image: the Docker daemon does not answer ($cli version); start it: scripts/docker-engine.sh start" >&2
        exit 2
    fi
    if "$cli" buildx version >/dev/null 2>&1; then
        builder=("$cli" buildx build --load) about="BuildKit through buildx ($("$cli" buildx version | head -1))"
        break
    fi
    client=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$client" ] && [ "${client%%.*}" -lt 23 ] 2>/dev/null; then
        builder=(env DOCKER_BUILDKIT=1 "$cli" build) about="BuildKit built into the docker $client CLI ($cli)"
        break
    fi
done
if [ ${#builder[@]} -eq 0 ]; then
    echo "make image: no BuildKit builder: install the buildx plugin for your docker CLI, or Debian's docker.io" >&2
    exit 2
fi

digest=$("$PYTHON" -c 'from pneumonia_kfp.pipelines.docker import source_digest; print(source_digest())')
echo "make image: building $IMAGE with $about${BASE_IMAGE:+ on $BASE_IMAGE}"
start=$(date +%s)
# the host network: engines started without a bridge (--bridge=none) have no other
"${builder[@]}" --network host -f images/Dockerfile ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} \
    --build-arg "SOURCE_DIGEST=$digest" -t "$IMAGE" .
echo "make image: built $IMAGE in $(( $(date +%s) - start )) s with $about"
