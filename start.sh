#!/usr/bin/env bash
# Starts the server the way main.py does (gunicorn, one worker, many threads).
# Uses ./.venv when present. Extra arguments go to main.py, e.g. ./start.sh --demo --port 8000
# The image's ENTRYPOINT and HEALTHCHECK both go through here: ./start.sh --healthcheck exits 0 only
# when the server this folder's settings recorded (tmp/server.json) answers /health.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
mkdir -p logs tmp models
exec "$PYTHON" main.py "$@"
