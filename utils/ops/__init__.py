"""Operations: gunicorn worker, lifecycle, health check, structured logs, metrics."""
