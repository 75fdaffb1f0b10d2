"""GET /openapi.json and /docs: the description keeps step with the routes (every Flask rule is in
it with its methods, every described operation is a route), its auth with what the app enforces,
its bounds with the parsers' own checks; /docs renders it from files the package ships."""
from __future__ import annotations

import math
import re

import pytest

from utils.api.openapi.components import component_schemas
from utils.api.openapi.spec import IGNORED_METHODS

TOKENS = {"API_TOKEN": "api-secret", "ADMIN_TOKEN": "admin-secret", "METRICS_TOKEN": "metrics-secret"}
SCHEMES = {"apiToken": "API_TOKEN", "adminToken": "ADMIN_TOKEN", "metricsToken": "METRICS_TOKEN"}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def secured(make_settings):
    from app import create_app
    from utils.config.runtime import RuntimeSettings
    app = create_app(make_settings(**TOKENS), background=False,
                     runtime=RuntimeSettings.from_env({"METRICS_TOKEN": TOKENS["METRICS_TOKEN"]}))
    yield app
    app.extensions["model_server"].manager.shutdown()


@pytest.fixture(scope="module")
def document(secured) -> dict:
    response = secured.test_client().get("/openapi.json", headers={"Authorization": "Bearer api-secret"})
    assert response.status_code == 200 and response.is_json
    return response.get_json()


def shape(path: str) -> str:
    """A path template with its variable names erased: /jobs/<job_id> and /jobs/{id} read the same."""
    return re.sub(r"<[^<>]+>|\{[^{}]+\}", "{}", path)


def routes(app) -> set[tuple[str, str]]:
    return {(shape(rule.rule), method.lower()) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
            for method in rule.methods - IGNORED_METHODS}


def described(document: dict) -> set[tuple[str, str]]:
    return {(shape(path), method) for path, item in document["paths"].items() for method in item
            if method in HTTP_METHODS}


def test_every_route_is_described_and_every_operation_is_a_route(secured, document):
    assert document["openapi"] == "3.1.0"
    app_routes, operations = routes(secured), described(document)
    assert app_routes - operations == set(), "routes missing from the description"
    assert operations - app_routes == set(), "operations without a route"
    assert len(app_routes) >= 30


def test_the_step_check_catches_a_missing_route_and_a_stale_operation(secured, document):
    """The comparison above is not vacuous: drop a path from the description, add one to it."""
    trimmed = {**document, "paths": {k: v for k, v in document["paths"].items() if k != "/health"}}
    assert routes(secured) - described(trimmed) == {("/health", "get")}
    stale = {**document, "paths": {**document["paths"], "/gone/{x}": {"get": {}}}}
    assert described(stale) - routes(secured) == {("/gone/{}", "get")}


def test_operation_ids_are_the_flask_endpoints(secured, document):
    ids = {op["operationId"] for item in document["paths"].values() for m, op in item.items() if m in HTTP_METHODS}
    endpoints = {rule.endpoint for rule in secured.url_map.iter_rules() if rule.endpoint != "static"}
    assert ids == endpoints


def concrete(path: str, operation: dict) -> str:
    """A path to call: each variable its schema's first enum value, else a plausible string."""
    values = {p["name"]: (p["schema"].get("enum") or ["0" * 32])[0]
              for p in operation.get("parameters", []) if p["in"] == "path"}
    return re.sub(r"\{([^{}]+)\}", lambda m: str(values[m.group(1)]), path)


def test_auth_in_the_description_is_what_the_app_enforces(secured, document):
    """Every operation with a security requirement answers 401 without its token (and documents
    401); every operation without one is served without a token. The check happens before the
    body is read, so no request here loads a model."""
    client = secured.test_client()
    seen = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            url = concrete(path, operation)
            response = client.open(url, method=method.upper())
            schemes = [name for requirement in operation.get("security", []) for name in requirement]
            if schemes:
                assert response.status_code == 401, (method, url)
                assert "401" in operation["responses"]
                token = TOKENS[SCHEMES[schemes[0]]]
                authorized = client.open(url, method=method.upper(), headers={"Authorization": f"Bearer {token}"})
                assert authorized.status_code != 401, (method, url, "its own token opens it")
                seen.add(schemes[0])
            else:
                assert response.status_code != 401, (method, url, "open in the description, guarded by the app")
    assert seen == set(SCHEMES)


def test_the_model_keys_are_named_only_for_a_caller_who_may_list_them(secured):
    client = secured.test_client()
    keys = list(secured.extensions["model_server"].settings.models)

    def enum(headers):
        doc = client.get("/openapi.json", headers=headers).get_json()
        parameter = doc["paths"]["/generate/{model}"]["post"]["parameters"][0]
        return parameter["schema"].get("enum")
    assert enum({}) is None
    assert enum({"Authorization": "Bearer wrong"}) is None
    assert enum({"Authorization": "Bearer api-secret"}) == keys
    assert enum({"Authorization": "Bearer admin-secret"}) == keys


def test_errors_have_our_shape_and_openais_on_v1(document):
    def error_ref(path, method, status):
        return document["paths"][path][method]["responses"][status]["$ref"]
    assert error_ref("/generate/{model}", "post", "400").endswith("/ErrorBody400")
    assert error_ref("/v1/chat/completions", "post", "400").endswith("/OpenAIError400")
    assert error_ref("/v1/chat/completions", "post", "414").endswith("/ErrorBody414")  # gunicorn's, before routing
    body = document["components"]["schemas"]["OpenAIErrorDetail"]
    assert set(body["required"]) == {"message", "type", "param", "code"}
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error", "details"]


def test_bodies_take_json_and_multipart_where_the_routes_do(document):
    generate = document["paths"]["/generate/{model}"]["post"]["requestBody"]["content"]
    assert set(generate) == {"application/json", "multipart/form-data"}
    assert set(document["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]) == \
        {"multipart/form-data"}
    form = document["components"]["schemas"]["GenerateTextForm"]["properties"]
    assert form["image"]["format"] == "binary" and form["images"]["items"]["format"] == "binary"


def test_a_reload_that_changes_a_limit_changes_the_description(secured, document):
    services = secured.extensions["model_server"]
    before = services.settings
    try:
        services.settings = before.with_model("deepseek", limits=before.models["deepseek"].limits.__class__(
            max_new_tokens=9999))
        doc = secured.test_client().get("/openapi.json").get_json()
        assert doc["components"]["schemas"]["GenerateText"]["properties"]["max_new_tokens"]["maximum"] == 9999
    finally:
        services.settings = before


# ------------------------------------------------------------------ the bounds are the parsers'

def _bounded(schema: dict):
    """(field, low, high, integer) of every numeric property with a declared range."""
    for name, prop in schema["properties"].items():
        if prop.get("type") in ("integer", "number") and "maximum" in prop and "minimum" in prop:
            yield name, prop["minimum"], prop["maximum"], prop["type"] == "integer"


def _outside(value, integer: bool, direction: float):
    return value + int(direction) if integer else math.nextafter(value, direction * math.inf)


def _parsers(settings):
    from utils.api.openai_responses import parse_responses
    from utils.api.openai_translation import parse_chat, parse_completion, parse_image_request
    from utils.serving.image_requests import parse_image_job
    from utils.serving.inference import parse_job
    text, image = settings.models["deepseek"], settings.models["flux"]
    chat = {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}]}
    return {
        "GenerateText": (lambda body: parse_job(body, {}, text), {"prompt": "hi"}, text),
        "GenerateImage": (lambda body: parse_image_job(body, {}, image), {"prompt": "hi", "width": 64, "height": 64},
                          image),
        "ChatRequest": (lambda body: parse_chat(body, text), dict(chat, logprobs=True), text),  # top_logprobs needs it
        "CompletionRequest": (lambda body: parse_completion(body, text), {"model": "deepseek", "prompt": "hi"}, text),
        "ResponsesRequest": (lambda body: parse_responses(body, text), {"model": "deepseek", "input": "hi"}, text),
        "ImageGenerationRequest": (lambda body: parse_image_request(body, image, edit=False),
                                   {"model": "flux", "prompt": "hi", "size": "64x64"}, image),
    }


@pytest.mark.parametrize("component", ["GenerateText", "GenerateImage", "ChatRequest", "CompletionRequest",
                                       "ResponsesRequest", "ImageGenerationRequest"])
def test_declared_ranges_are_the_parsers_ranges(make_settings, component):
    """Each declared minimum and maximum is accepted by the route's parser, and the next value past
    it is refused (400): the description says what the code checks, for one model per family."""
    from utils.errors import InvalidInput
    settings = make_settings()
    parse, base, spec = _parsers(settings)[component]
    one_model = settings.replace(models={spec.key: spec})  # the bounds of this model alone
    schema = component_schemas(one_model, show_models=True)[component]
    fields = list(_bounded(schema))
    assert len(fields) >= 4
    for name, low, high, integer in fields:
        if name in ("width", "height"):  # a side's maximum needs the other side small: checked together below
            continue
        for edge, direction in ((low, -1), (high, 1)):
            parse({**base, name: edge})
            with pytest.raises(InvalidInput):
                parse({**base, name: _outside(edge, integer, direction)})


def test_declared_image_sides_are_the_parsers_sides(make_settings):
    from utils.errors import InvalidInput
    from utils.serving.image_requests import parse_image_job
    settings = make_settings()
    flux = settings.models["flux"]
    side = component_schemas(settings.replace(models={"flux": flux}), show_models=False)["GenerateImage"][
        "properties"]["width"]
    step = side["multipleOf"]
    assert side["maximum"] * step == flux.limits.max_image_pixels
    parse_image_job({"prompt": "hi", "width": side["maximum"], "height": step}, {}, flux)
    parse_image_job({"prompt": "hi", "width": side["minimum"], "height": step}, {}, flux)
    for width in (side["maximum"] + step, side["minimum"] + 1, side["minimum"] - step):
        with pytest.raises(InvalidInput):
            parse_image_job({"prompt": "hi", "width": width, "height": step}, {}, flux)


# ------------------------------------------------------------------ /docs

def test_docs_render_the_description_from_local_files(client):
    page = client.get("/docs/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '"/openapi.json"' in html
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(source.startswith("/docs/") for source in sources), sources  # nothing from a CDN
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and asset.content_length > 100, source
    bundle = client.get("/docs/swagger-ui-bundle.js").get_data(as_text=True)
    assert "SwaggerUIBundle" in bundle
    assert client.get("/docs").status_code == 308  # to /docs/
    missing = client.get("/docs/nothing-here.js")
    assert missing.status_code == 404 and missing.get_json()["error"] == "not found"
