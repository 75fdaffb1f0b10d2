# GPU image: CUDA runtime from the torch wheels; FFmpeg comes inside PyAV's wheel.
FROM python:3.11-slim AS runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/app/.cache/huggingface TOKENIZERS_PARALLELISM=false

RUN apt-get update && apt-get install -y --no-install-recommends curl libgomp1 \
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD curl -fsS http://127.0.0.1:5000/health || exit 1
ENTRYPOINT ["./start.sh", "--host", "0.0.0.0"]
