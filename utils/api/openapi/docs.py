"""GET /docs/: the description rendered by Swagger UI, whose files the flask-swagger-ui package
ships (swagger-ui 5, which reads OpenAPI 3.1): nothing is fetched from a CDN."""
from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask_swagger_ui import get_swaggerui_blueprint

DOCS_FILES = Path(flask_swagger_ui.__file__).with_name("dist")
docs_bp = get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "Model server API",
                                                                   "layout": "BaseLayout"})
