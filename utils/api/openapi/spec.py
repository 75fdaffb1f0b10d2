"""The OpenAPI 3.1 document of a running app, assembled with apispec from the app's own routes
(Flask's url_map), the operations table (operations.py), the component schemas for its settings
(components.py) and the auth table the app enforces (utils/api/auth.py)."""
from __future__ import annotations

import logging
import re

from apispec import APISpec

from utils.api.auth import TOKEN_SETTINGS, guard_of, token_of
from utils.api.openapi.components import component_schemas, model_names
from utils.api.openapi.operations import OPERATIONS
from utils.api.wsgi import OPEN_WHILE_DRAINING

log = logging.getLogger("model_server.openapi")
API_VERSION = "1.0"
IGNORED_METHODS = {"HEAD", "OPTIONS"}   # Flask answers these for every route itself
VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
SCHEMES = {"admin": "adminToken", "api": "apiToken", "metrics": "metricsToken"}
BODY_ERRORS = (400, 408, 413)          # utils/api/wsgi.py's BodyGuard: incomplete body, BODY_TIMEOUT, the cap
ERRORS = {
    400: "invalid input: malformed JSON or form, a missing, wrong-typed or out-of-range field, undecodable media, "
         "media the model does not take, special tokens in text, a body cut short; `field` names the field",
    401: "a token is configured and the `Authorization: Bearer` header is missing or wrong",
    404: "unknown model, job or file (never a silent fallback)",
    408: "request timeout (the request's deadline passed; details hold what was generated), or body timeout "
         "(the body did not arrive within BODY_TIMEOUT)",
    409: "a conflict: the model serves requests (unload without wait), or the job is not finished, or finished",
    413: "the body is over MAX_CONTENT_LENGTH_MB, or a media item over its caps",
    414: "gunicorn: the request line is over 4094 bytes (limit_request_line); this shape even under /v1, whose "
         "path is not read yet",
    415: "neither JSON nor multipart/form-data",
    500: "a bug: the body holds only the request id, the log holds the trace",
    503: "shutting down (draining after SIGTERM), the model failed to load or does not fit in memory, its queue is "
         "full or the wait timed out, out of memory; Retry-After says when to try again",
}
GUNICORN = {414}                       # answered before the app: utils/ops/gunicorn_worker.py, always ErrorBody
TAGS = {"generate": "Our inference routes: text or images from any model", "openai": "OpenAI's API (/v1)",
        "jobs": "Asynchronous jobs: queue, poll, fetch", "service": "Liveness, readiness, models, metrics",
        "admin": "Operators: memory, models, config, cleanup", "pages": "Pages: the dashboard and these docs"}
HEADERS = {401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
           503: {"Retry-After": {"schema": {"type": "string"}}}}
DESCRIPTION = """\
Every model configured in models.yaml, behind our own routes (/generate, /jobs), OpenAI's (/v1) and the
operators' (/admin). Errors are `{"error", "details"}` (plus `field`), OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1.

Tokens, each only when it is set: API_TOKEN guards /generate, /jobs and /v1; ADMIN_TOKEN /admin (not the
dashboard page); METRICS_TOKEN /metrics; send `Authorization: Bearer <token>`. The model keys appear in
this description when API_TOKEN is not set or the request for it carries the API or admin token."""


def openapi_path(rule: str, names: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: "{" + names.get(m.group(1), m.group(1)) + "}", rule)


def build(app, settings, runtime, *, show_models: bool) -> dict:
    spec = APISpec(title="Model server", version=API_VERSION, openapi_version="3.1.0",
                   info={"description": DESCRIPTION})
    for tag, text in TAGS.items():  # the order /docs shows them in
        spec.tag({"name": tag, "description": text})
    for name, schema in component_schemas(settings, show_models=show_models).items():
        spec.components.schema(name, component=schema)
    for guard, scheme in SCHEMES.items():
        spec.components.security_scheme(scheme, {"type": "http", "scheme": "bearer",
                                                 "description": f"{TOKEN_SETTINGS[guard][1]}, when it is set"})
    for shape in ("ErrorBody", "OpenAIError"):
        for status, text in ERRORS.items():
            spec.components.response(f"{shape}{status}", {"description": text, "headers": HEADERS.get(status, {}),
                                                          "content": {"application/json": {"schema": shape}}})
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        operation = OPERATIONS.get(rule.endpoint)
        if operation is None:  # tests/test_openapi.py fails on this; a running server still answers the rest
            log.warning("route %s (%s) is not described", rule.rule, rule.endpoint)
            continue
        guard = guard_of(rule.rule, app.view_functions.get(rule.endpoint))
        secured = token_of(guard, settings, runtime) is not None
        described = _operation(rule, operation, settings, show_models, secured and SCHEMES[guard])
        spec.path(path=openapi_path(rule.rule, operation.names),
                  operations={method.lower(): described for method in sorted(rule.methods - IGNORED_METHODS)})
    return spec.to_dict()


def _operation(rule, operation, settings, show_models: bool, scheme: str | None) -> dict:
    variables = {operation.names.get(name, name) for name in rule.arguments}
    parameters = []
    for parameter in operation.params:
        if parameter["in"] == "path" and parameter["name"] not in variables:
            continue  # a second rule of the endpoint without it (/docs/ and /docs/<path>)
        parameter = dict(parameter)
        if show_models and parameter["name"] in operation.models_in:
            aliases = rule.rule.startswith("/v1")
            parameter["schema"] = {"enum": model_names(settings.models.values(), aliases=aliases)}
        parameters.append(parameter)
    shape = "OpenAIError" if rule.rule.startswith("/v1") else "ErrorBody"
    errors = set(operation.errors) | {414, 500}
    if operation.body is not None:
        errors |= set(BODY_ERRORS)
    if rule.rule not in OPEN_WHILE_DRAINING:
        errors.add(503)
    if scheme:
        errors.add(401)
    responses = {status: dict(response) for status, response in operation.ok.items()}
    for status, links in operation.links.items():
        responses[status]["links"] = links
    responses.update({status: f"{'ErrorBody' if status in GUNICORN else shape}{status}" for status in sorted(errors)
                      if status not in responses})
    described = {"operationId": rule.endpoint, "summary": operation.summary, "tags": [operation.tag],
                 "responses": dict(sorted(responses.items()))}
    if operation.description:
        described["description"] = operation.description
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {"required": True, "content": operation.body}
    if scheme:
        described["security"] = [{scheme: []}]
    return described
