#!/usr/bin/env bash
# Start or stop the Docker engine the tests use, the way this project's machines allow it: no bridge and
# no iptables (containers use the host network), the engine's own containerd. `start` does nothing when
# an engine already answers (and `stop` then leaves it alone: only what `start` started is stopped).
#   scripts/docker-engine.sh start|stop
set -euo pipefail
PIDFILE=${DOCKERD_PIDFILE:-/var/run/pneumonia-kfp-dockerd.pid}
LOG=${DOCKERD_LOG:-/var/log/pneumonia-kfp-dockerd.log}
answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

case "${1:-}" in
start)
    if answers; then echo "docker engine: already running ($(docker version --format '{{.Server.Version}}'))"; exit 0; fi
    command -v dockerd >/dev/null || { echo "docker engine: dockerd is missing; install it: apt-get install docker.io" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "docker engine: starting dockerd needs root" >&2; exit 2; }
    nohup dockerd --bridge=none --iptables=false --ip6tables=false --pidfile "$PIDFILE.dockerd" >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 120); do
        answers && { echo "docker engine: started ($(docker version --format '{{.Server.Version}}'), log $LOG)"; exit 0; }
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
        sleep 0.5
    done
    echo "docker engine: dockerd did not start; its log ($LOG) ends:" >&2; tail -5 "$LOG" >&2; exit 1
    ;;
stop)
    [ -f "$PIDFILE" ] || exit 0
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    echo "docker engine: stopped"
    ;;
*) echo "usage: scripts/docker-engine.sh start|stop" >&2; exit 2;;
esac
