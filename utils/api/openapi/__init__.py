"""GET /openapi.json (OpenAPI 3.1, built from the running app: spec.py) and GET /docs/ (Swagger UI,
its files served from the flask-swagger-ui package: docs.py). Both open, like /health: the
description holds no data, and names the model keys only for a caller who may list them."""
from __future__ import annotations

import hmac
import threading

from flask import Blueprint, current_app, jsonify, request

from utils.api.openapi.docs import docs_bp
from utils.api.openapi.spec import build

__all__ = ["bp", "docs_bp"]
bp = Blueprint("openapi", __name__)
_cache: dict[bool, tuple] = {}   # show_models -> (settings and app it was built for, the document)
_cache_lock = threading.Lock()


def _may_list_models(settings) -> bool:
    if settings.api_token is None:
        return True
    header = request.headers.get("Authorization", "")
    given = (header[7:] if header[:7].lower() == "bearer " else "").encode()
    return any(token is not None and hmac.compare_digest(given, token.encode())
               for token in (settings.api_token, settings.admin_token))


@bp.get("/openapi.json")
def description():
    services = current_app.extensions["model_server"]
    settings = services.settings  # replaced by a reload: the description follows
    show = _may_list_models(settings)
    with _cache_lock:
        cached = _cache.get(show)
        if cached is None or cached[0] is not settings or cached[1] is not current_app._get_current_object():
            cached = _cache[show] = (settings, current_app._get_current_object(),
                                     build(current_app, settings, services.runtime, show_models=show))
    return jsonify(cached[2])
