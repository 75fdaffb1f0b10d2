"""/v1: OpenAI's API over the same inference service as /generate (translation in utils/api/openai_translation)."""
from __future__ import annotations

import json
import time
from functools import partial

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context

from utils.api import openai_responses, openai_translation as oa, transcription
from utils.api.context import client_gone_probe, services
from utils.api.openai_choices import SingleChoice
from utils.errors import InvalidInput, UnsupportedMediaType
from utils.serving.image_requests import run_images

bp = Blueprint("openai", __name__, url_prefix="/v1")
STARTED = int(time.time())


def json_body() -> dict:
    if not (request.mimetype == "application/json" or (request.mimetype or "").endswith("+json")):
        raise UnsupportedMediaType(f"send Content-Type: application/json (got {request.mimetype or 'none'})")
    try:
        body = json.loads(request.get_data(cache=True) or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}", error="malformed JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", error="malformed JSON")
    return body


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def sse(chunks) -> Response:
    """Server-sent events of JSON chunks, then [DONE]; closing the response (a client gone) closes
    the stream, which cancels its row in the engine."""
    def events():
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:  # the status line is gone already: report in the stream
            current_app.logger.exception("stream failed")
            yield f"data: {json.dumps(oa.error_body(500, 'generation failed', type(exc).__name__))}\n\n"
        yield "data: [DONE]\n\n"
    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def run(key: str, jobs: list, to_body, to_chunks, body: dict):
    """One prompt and one choice as before (any backend); n choices or several prompts as one group of
    rows (InferenceService.generate_choices / stream_choices)."""
    svc = services()
    g.model = key
    n = jobs[0].n
    single = len(jobs) == 1 and n == 1
    if jobs[0].stream:
        stream = SingleChoice(svc.inference.stream(key, jobs[0])) if single else \
            svc.inference.stream_choices(key, jobs, n)
        g.model_device = stream.device
        response = sse(to_chunks(key, stream, include_usage(body)))
        response.call_on_close(stream.close)
        return response
    if single:
        results = [svc.inference.generate(key, jobs[0], is_gone=client_gone_probe())]
    else:
        results = svc.inference.generate_choices(key, jobs, n, is_gone=client_gone_probe())
    g.completion_tokens, g.model_device = sum(r.completion_tokens for r in results), results[0].device
    return jsonify(to_body(key, results))


@bp.get("/models")
def list_models():
    svc = services()
    snapshot = svc.manager.snapshot()
    return jsonify({"object": "list", "data": [oa.model_card(spec, STARTED, snapshot[key]["loaded"])
                                               for key, spec in svc.settings.models.items()]})


@bp.get("/models/<path:name>")
def get_model(name: str):
    svc = services()
    key = oa.resolve_model(svc.settings, name)
    return jsonify(oa.model_card(svc.settings.models[key], STARTED, svc.manager.snapshot_one(key)["loaded"]))


@bp.post("/chat/completions")
def chat_completions():
    svc = services()
    body = json_body()
    key = oa.resolve_model(svc.settings, body.get("model"))
    spec = svc.settings.models[key]
    job, tools = oa.parse_chat(body, spec)
    return run(key, [job], partial(oa.chat_response, tools=tools, spec=spec),
               partial(oa.chat_chunks, tools=tools, spec=spec), body)


def typed_sse(events) -> Response:
    """Server-sent events of the Responses API: `event: <type>` beside each JSON event, no [DONE]
    (response.completed, .incomplete or .failed is the last); failures are events of their own
    (utils/api/openai_responses.py)."""
    def lines():
        for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
    return Response(stream_with_context(lines()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.post("/responses")
def responses():
    """OpenAI's Responses API, translated to the chat path (no stored responses; one answer, no n)."""
    svc = services()
    body = json_body()
    key = oa.resolve_model(svc.settings, body.get("model"))
    spec = svc.settings.models[key]
    parsed = openai_responses.parse_responses(body, spec)
    g.model = key
    if parsed.job.stream:
        stream = svc.inference.stream(key, parsed.job)
        g.model_device = stream.device
        response = typed_sse(openai_responses.response_events(key, stream, parsed, spec))
        response.call_on_close(stream.close)
        return response
    result = svc.inference.generate(key, parsed.job, is_gone=client_gone_probe())
    g.completion_tokens, g.model_device = result.completion_tokens, result.device
    return jsonify(openai_responses.response_body(key, result, parsed, spec))


@bp.post("/completions")
def completions():
    svc = services()
    body = json_body()
    key = oa.resolve_model(svc.settings, body.get("model"))
    jobs = oa.parse_completion(body, svc.settings.models[key])
    return run(key, jobs, partial(oa.completion_response, jobs=jobs), partial(oa.completion_chunks, jobs=jobs), body)


@bp.post("/audio/transcriptions")
def transcriptions():
    svc = services()
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with 'file' and 'model'")
    key = oa.resolve_model(svc.settings, request.form.get("model"))
    upload = request.files.get("file")
    audio = upload.read() if upload else b""
    if not audio:
        raise InvalidInput("'file' (the audio) is required", field="file", error="missing field")
    spec = svc.settings.models[key]
    g.model = key
    if spec.family == "speech_to_text":  # Whisper: every response format (utils/api/transcription.py)
        job, options = transcription.parse(request.form, audio, spec)
        result = svc.inference.generate(key, job, is_gone=client_gone_probe())
        g.completion_tokens, g.model_device = result.completion_tokens, result.device
        body, mimetype = transcription.render(result, options)
        return jsonify(body) if isinstance(body, dict) else Response(body, mimetype=mimetype)
    job, response_format = oa.parse_transcription(request.form, audio, spec)
    result = svc.inference.generate(key, job, is_gone=client_gone_probe())
    if response_format == "text":
        return Response(result.text, mimetype="text/plain")
    return jsonify({"text": result.text, "usage": {"type": "tokens", "input_tokens": result.prompt_tokens,
                                                   "output_tokens": result.completion_tokens,
                                                   "total_tokens": result.prompt_tokens + result.completion_tokens}})


@bp.post("/images/generations")
def image_generations():
    """OpenAI's images API on a text_to_image model (JSON; b64_json out)."""
    svc = services()
    body = json_body()
    key = oa.resolve_model(svc.settings, body.get("model"))
    job = oa.parse_image_request(body, svc.settings.models[key], edit=False)
    return _images(key, job)


@bp.post("/images/edits")
def image_edits():
    """OpenAI's image edits on an image_edit model: multipart `image` (or `image[]`, one) + `prompt`."""
    svc = services()
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with 'image', 'prompt' and 'model'")
    key = oa.resolve_model(svc.settings, request.form.get("model"))
    files = [f for name in ("image", "image[]") for f in request.files.getlist(name)]
    if not files:
        raise InvalidInput("'image' (the image to edit) is required", field="image", error="missing field")
    if len(files) > 1:
        raise InvalidInput(f"'{key}' edits one image; got {len(files)}", field="image", error="too many media items")
    if "mask" in request.files:
        raise InvalidInput("'mask' is not supported by this server (the whole image is edited)", field="mask",
                           error="unsupported parameter")
    form = {k: request.form.get(k) for k in request.form}
    job = oa.parse_image_request(form, svc.settings.models[key], edit=True, image=files[0].read())
    return _images(key, job)


def _images(key: str, job):
    g.model = key
    outcome = run_images(services().inference, key, job, is_gone=client_gone_probe())
    return jsonify(oa.images_response(outcome))
