#!/usr/bin/env bash
# Smoke test of the image (not part of CI): build it with docker or podman, run --demo on a free
# loopback port with a non-default container port, then check /health, one generate, the admin
# 401/200, the image's own HEALTHCHECK (healthy, and unhealthy without a server record) and a clean
# SIGTERM stop.
#
#   bench/container_smoke.sh                 # docker if its daemon answers, else podman
#   ENGINE=podman bench/container_smoke.sh   # force one; GPU=1 adds the GPUs (not needed for --demo)
#   SKIP_BUILD=1 IMAGE=model-server:latest bench/container_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-model-server:smoke}
CONTAINER_PORT=27431                        # not 5000: the health check must follow --port
TOKEN=smoke-$RANDOM$RANDOM
API=smoke-api-$RANDOM$RANDOM                 # both tokens: without them the server refuses 0.0.0.0
NAME=model-server-smoke-$$

if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else echo "neither a running docker nor podman: nothing to test" >&2; exit 2; fi
fi
echo "engine: $ENGINE ($($ENGINE --version))"

fail() { echo "FAIL: $*" >&2; $ENGINE logs "$NAME" 2>&1 | tail -30 >&2 || true; exit 1; }
cleanup() { $ENGINE rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

if [ -z "${SKIP_BUILD:-}" ]; then
    format=(); [ "$ENGINE" = podman ] && format=(--format docker)   # OCI images drop HEALTHCHECK
    start=$(date +%s)
    $ENGINE build "${format[@]}" -t "$IMAGE" .
    echo "built in $(( $(date +%s) - start )) s"
fi
$ENGINE image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "image size: %.2f GB\n", $1 / 1e9}'
test_cmd=$($ENGINE image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")
echo "HEALTHCHECK: $test_cmd"
case "$test_cmd" in null|""|"[]") fail "the image has no HEALTHCHECK (podman without --format docker?)";; esac

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
gpu=(); [ -n "${GPU:-}" ] && { [ "$ENGINE" = podman ] && gpu=(--device nvidia.com/gpu=all) || gpu=(--gpus all); }
$ENGINE run -d --name "$NAME" "${gpu[@]}" -p "127.0.0.1:$PORT:$CONTAINER_PORT" -e ADMIN_TOKEN="$TOKEN" -e API_TOKEN="$API" \
    --health-interval 2s "$IMAGE" --demo --port "$CONTAINER_PORT" >/dev/null
URL=http://127.0.0.1:$PORT
echo "container $NAME on $URL"

start=$(date +%s)
until curl -fsS "$URL/health" >/dev/null 2>&1; do
    [ "$($ENGINE inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "container exited"
    [ $(( $(date +%s) - start )) -lt 120 ] || fail "/health not answering after 120 s"
    sleep 0.5
done
echo "ok  /health after $(( $(date +%s) - start )) s"

answer=$(curl -fsS "$URL/generate/deepseek" -H 'Content-Type: application/json' -H "Authorization: Bearer $API" \
         -d '{"prompt": "Say hi", "max_new_tokens": 4}') || fail "generate"
echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)["model"] == "deepseek"' \
    || fail "generate answered $answer"
echo "ok  generate"

code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/admin/model_status")
[ "$code" = 401 ] || fail "admin without token answered $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$URL/admin/model_status")
[ "$code" = 200 ] || fail "admin with token answered $code"
echo "ok  admin 401 without the token, 200 with it"

start=$(date +%s)
while :; do
    status=$($ENGINE inspect --format '{{.State.Health.Status}}' "$NAME")
    [ "$status" = healthy ] && break
    [ $(( $(date +%s) - start )) -lt 90 ] || fail "health status still '$status' after 90 s"
    sleep 1
done
echo "ok  HEALTHCHECK healthy on container port $CONTAINER_PORT"
if $ENGINE exec -e LOG_DIR=/tmp/no-record "$NAME" ./start.sh --healthcheck; then
    fail "the health check passed without a server record"
fi
echo "ok  health check unhealthy without a record"

$ENGINE exec "$NAME" id -u | grep -qx 1000 || fail "not running as uid 1000"
$ENGINE stop -t 30 "$NAME" >/dev/null
code=$($ENGINE inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
echo "ok  SIGTERM stopped it cleanly"
echo "all checks passed"
