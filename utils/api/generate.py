"""POST /generate/<model>: the reference server's contract, validated."""
from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, jsonify, stream_with_context

from utils.api.context import client_gone_probe, request_body, services
from utils.api.images import generate_image
from utils.serving.image_requests import makes_images
from utils.serving.inference import parse_job, result_body

bp = Blueprint("generate", __name__)


@bp.post("/generate/<model>")
def generate(model: str):
    svc = services()
    spec = svc.inference.spec(model)  # unknown model -> 404 before the body is even read
    body, uploads = request_body()
    if makes_images(spec, body):  # images out: utils/api/images.py
        return generate_image(model, spec, body, uploads)
    job = parse_job(body, uploads, spec)
    if job.stream:
        pieces = svc.inference.stream(model, job)
        g.model_device = pieces.device

        def events():
            try:
                for piece in pieces:
                    yield f"data: {json.dumps({'text': piece})}\n\n"
            except Exception as exc:  # the status line is gone already: report in the stream
                current_app.logger.exception("stream of %s failed", model)
                yield f"data: {json.dumps({'error': 'generation failed', 'details': type(exc).__name__})}\n\n"
            finally:
                pieces.close()
            yield "data: [DONE]\n\n"
        response = Response(stream_with_context(events()), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(pieces.close)
        return response
    result = svc.inference.generate(model, job, is_gone=client_gone_probe())
    g.model_device = result.device
    g.completion_tokens = result.completion_tokens
    return jsonify(result_body(model, result))


@bp.get("/health")
def health():
    svc = services()
    # liveness: backend ray answers from the replicas' last known state, never waiting for them
    snapshot = svc.manager.snapshot(stale_ok=True) if svc.cluster is not None else svc.manager.snapshot()
    return jsonify({"status": "ok", "models": {k: v["state"] for k, v in snapshot.items()},
                    "loaded": [k for k, v in snapshot.items() if v["loaded"]], "demo": svc.settings.demo})


@bp.get("/ready")
def ready():
    """Readiness (load balancers, the image's HEALTHCHECK): 200 only when this process should get
    traffic; 503 with the reasons otherwise. /health stays the liveness answer."""
    svc = services()
    preloads = [key for key, spec in svc.settings.models.items() if spec.preload]
    snapshot = svc.manager.snapshot() if preloads else {}
    failed = {key: snapshot[key].get("error") or "failed to load" for key in preloads
              if snapshot.get(key, {}).get("state") == "error"}
    is_ready, body = svc.lifecycle.readiness(svc.settings.models_dir, failed)
    response = jsonify(body)
    response.status_code = 200 if is_ready else 503
    if not is_ready:
        response.headers["Retry-After"] = "5"
    return response


@bp.get("/models")
def list_models():
    svc = services()
    return jsonify({"models": [{"key": key, "family": spec.family, "repo_id": spec.repo_id}
                               for key, spec in svc.settings.models.items()]})
