# GPU image: CUDA runtime from the torch wheels; FFmpeg comes inside PyAV's wheel.
# ~6.6 GB, of which ~6.2 GB are torch's CUDA 13 wheels; the host needs NVIDIA driver >= 580.
# Podman: build with `--format docker` (or BUILDAH_FORMAT=docker), or the OCI format drops HEALTHCHECK.
FROM python:3.11-slim AS runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/app/.cache/huggingface TOKENIZERS_PARALLELISM=false

RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY app.py main.py models.yaml start.sh ./
COPY utils ./utils
RUN useradd --uid 1000 --create-home app \
    && mkdir -p models logs tmp .cache && chown -R app:app /app
USER app

EXPOSE 5000
VOLUME ["/app/models", "/app/logs", "/app/tmp"]
# The server records the host/port/pid it really bound in logs/server.json (whatever --port or PORT
# said); the check reads that record (stdlib only) and asks GET /ready there: unhealthy when the record
# is missing or stale, or the server does not answer 200 (preloading, models folder unreadable, draining).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD ["./start.sh", "--healthcheck"]
# All interfaces: the server refuses to start unless ADMIN_TOKEN and API_TOKEN are set (or --insecure).
# SIGTERM drains for SHUTDOWN_GRACE (30 s) + up to 15 s: give `docker stop` / `docker run` --stop-timeout 60.
ENTRYPOINT ["./start.sh", "--host", "0.0.0.0"]
