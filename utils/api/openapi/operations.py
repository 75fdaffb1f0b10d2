"""What each route (by its Flask endpoint) takes and answers: the operations of the description.
Schemas are named components (components.py); the errors every route shares (500, 503 while
draining, 401 where a token is set, the body's 400/408/413) are added by spec.py from the code that
raises them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from utils.api.admin import DEVICE_RE
from utils.api.dashboard import FILES as DASHBOARD_FILES
from utils.api.openapi.docs import DOCS_FILES
from utils.api.jobs import MAX_PAGE
from utils.jobs.store import STATES

JSON = "application/json"
FORM = "multipart/form-data"
SSE = "text/event-stream"
PNG_DATA_URL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42u3NMQEAAAQAMKTRP4V"
                "YSvBtBZbTHZ8qngkEAoFAIBAIBIIrC9JiAVggSmjwAAAAAElFTkSuQmCC")  # 32x32, red
JOB_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
ADMIN_WAIT = {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 600},
              "description": "seconds to wait for the model's requests (or its load) instead of answering 409"}


@dataclass
class Operation:
    summary: str
    tag: str
    ok: dict[int, dict]                      # status -> response object (schemas by component name)
    errors: tuple[int, ...] = ()             # statuses of ErrorBody (OpenAIError under /v1)
    body: dict[str, Any] | None = None       # media type -> media type object
    params: list[dict] = field(default_factory=list)
    description: str = ""
    names: dict[str, str] = field(default_factory=dict)   # Flask variable -> name in the path template
    models_in: tuple[str, ...] = ()          # parameters whose values are the model keys
    links: dict[int, dict] = field(default_factory=dict)
    maxima: dict[str, str] = field(default_factory=dict)  # parameter -> the ServerSettings field bounding it


def reply(description: str, schema: Any = None, media: str = JSON, **more: Any) -> dict:
    content = {media: {"schema": schema}} if schema is not None else {media: {}}
    for other, other_schema in more.pop("also", {}).items():
        content[other] = {"schema": other_schema}
    return {"description": description, "content": content, **more}


def either(*names: str) -> dict:
    return {"anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in names]}


def path_param(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string"}}


def query(name: str, schema: dict, description: str = "") -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


STREAM = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
          "description": "one server-sent event: `data: {...}` (JSON), the last one `data: [DONE]`"}
GENERATE_EXAMPLES = {
    "text": {"value": {"prompt": "Why is the sky blue?", "max_new_tokens": 8}},
    "image question": {"value": {"prompt": "What color is this?", "image": PNG_DATA_URL, "max_new_tokens": 8}},
    "make an image": {"value": {"prompt": "a red fox in the snow", "num_inference_steps": 2, "width": 64,
                                "height": 64}},
    "edit an image": {"value": {"prompt": "make it blue", "image": PNG_DATA_URL, "num_inference_steps": 2}},
}
GENERATE_BODY = {JSON: {"schema": either("GenerateText", "GenerateImage"), "examples": GENERATE_EXAMPLES},
                 FORM: {"schema": either("GenerateTextForm", "GenerateImageForm")}}
INFERENCE_ERRORS = (400, 404, 408, 413, 415, 503)
JOB_LINKS = {"status": {"operationId": "jobs.status", "parameters": {"id": "$response.body#/job_id"}},
             "result": {"operationId": "jobs.result", "parameters": {"job_id": "$response.body#/job_id"}},
             "cancel": {"operationId": "jobs.cancel", "parameters": {"id": "$response.body#/job_id"}}}

# GET /device: names, and one entry per device (name, memory, the models there); one device alone is an entry.
DEVICE_REPORT = {"type": "object", "additionalProperties": True,
                 "properties": {"devices": {"type": "array", "items": {"type": "string"}},
                                "details": {"type": "array", "items": {"type": "object"}},
                                "replicas": {"type": "object"}}}

OPERATIONS: dict[str, Operation] = {
    # ------------------------------------------------------------ inference (utils/api/generate.py, images.py)
    "generate.generate": Operation(
        "Generate text, or images, with a model", "generate",
        {200: reply("the answer (JSON), or its pieces as server-sent events with `stream: true`",
                    either("GenerateTextResult", "GenerateImageResult"), also={SSE: STREAM})},
        INFERENCE_ERRORS, GENERATE_BODY,
        [path_param("model", "the model's key (GET /models)")], models_in=("model",),
        description="The body's fields depend on the model's family: text out (GenerateText) or images out "
                    "(GenerateImage). Media are base64 or data URLs in JSON, files in a multipart form."),
    "generate.health": Operation("Liveness and each model's state", "service", {200: reply("alive", "Health")}),
    "generate.ready": Operation(
        "Readiness: 200 when this process should get traffic", "service",
        {200: reply("ready", "Ready"),
         503: reply("not ready (preloading, draining, models folder unreadable): the reasons", "Ready",
                    headers={"Retry-After": {"schema": {"type": "string"}}})}),
    "generate.list_models": Operation("The configured models", "service", {200: reply("every model", "ModelList")}),
    # ------------------------------------------------------------ devices (utils/api/devices.py, seed 004)
    "devices.device": Operation(
        "The devices this server sees (seed 004's /device): all, or one with ?device=", "service",
        {200: reply("every device (`devices`, `details`, and `replicas` under the Ray backend), or the one named "
                    "by ?device=", DEVICE_REPORT)}, (400,),
        params=[query("device", {"type": "string", "maxLength": 64},
                      "CPU, GPU, GPU.N, cpu, cuda or cuda:N; without it, every device")]),
    # ------------------------------------------------------------ jobs (utils/api/jobs.py)
    "jobs.submit": Operation(
        "Queue a job: the body /generate takes, run later", "jobs",
        {202: reply("accepted; poll the Location", "Job",
                    headers={"Location": {"required": True, "schema": {"type": "string"}}})},
        (400, 404, 408, 413, 415, 503), GENERATE_BODY,
        [path_param("id", "the model's key (GET /models)")], names={"model": "id"}, models_in=("id",),
        links={202: JOB_LINKS},
        description="Checked now as /generate checks it (400 before anything is queued); no `stream`, and no "
                    "synchronous size limit. 503 with Retry-After when jobs.max_queued jobs wait."),
    "jobs.status": Operation(
        "A job's state: queued (position), running (progress), succeeded (result urls), failed, cancelled",
        "jobs", {200: reply("the job", "Job")}, (404,),
        params=[path_param("id", "the job's id", JOB_ID)], names={"job_id": "id"}),
    "jobs.cancel": Operation(
        "Cancel a job: a queued one at once, a running one at its next step", "jobs",
        {200: reply("cancelled (or it was already)", "Job"), 202: reply("running: it stops at its next step", "Job")},
        (404, 409), params=[path_param("id", "the job's id", JOB_ID)], names={"job_id": "id"}),
    "jobs.result": Operation(
        "A finished job's result: a PNG (?index=N of several) or a text model's JSON answer", "jobs",
        {200: reply("the result", {"type": "string", "format": "binary"}, "image/png",
                    also={JSON: {"$ref": "#/components/schemas/GenerateTextResult"}})},
        (400, 404, 409),
        params=[path_param("job_id", "the job's id", JOB_ID),
         query("index", {"type": "integer", "minimum": 0, "maximum": 1_000_000}, "which image (0 = the first)")]),
    "jobs.listing": Operation(
        "Jobs, newest first, a page at a time", "jobs", {200: reply("one page", "JobPage")}, (400, 404),
        params=[query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
                query("before", {"type": "integer", "minimum": 1, "maximum": 2**62}, "`next` of the previous page"),
                query("status", {"enum": list(STATES)}),
                query("model", {"type": "string"}, "only this model's jobs")], models_in=("model",)),
    # ------------------------------------------------------------ OpenAI (utils/api/openai.py)
    "openai.list_models": Operation("OpenAI: the models", "openai", {200: reply("every model", "ModelCards")}),
    "openai.get_model": Operation(
        "OpenAI: one model", "openai", {200: reply("the model", "ModelCard")}, (404,),
        params=[path_param("name", "its key, or its Hub id")], models_in=("name",)),
    "openai.chat_completions": Operation(
        "OpenAI: chat completions (every text-out family)", "openai",
        {200: reply("the completion, or chat.completion.chunk events with `stream: true`", "ChatCompletion",
                    also={SSE: STREAM})},
        INFERENCE_ERRORS,
        {JSON: {"schema": "ChatRequest", "examples": {
            "text": {"value": {"model": "deepseek", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                               "max_tokens": 8}},
            "image": {"value": {"model": "qwen_vl", "max_tokens": 8, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
                {"type": "text", "text": "What color is this?"}]}]}}}}}),
    "openai.responses": Operation(
        "OpenAI: the Responses API (every text-out family; nothing stored)", "openai",
        {200: reply("the response, or its typed events (response.created ... response.completed) with `stream: true`",
                    "ResponseObject", also={SSE: STREAM})},
        INFERENCE_ERRORS,
        {JSON: {"schema": "ResponsesRequest", "examples": {
            "text": {"value": {"model": "deepseek", "input": "Why is the sky blue?", "max_output_tokens": 8}},
            "image": {"value": {"model": "qwen_vl", "max_output_tokens": 8, "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": PNG_DATA_URL},
                {"type": "input_text", "text": "What color is this?"}]}]}}}}},
        description="A translation of /v1/chat/completions: the same models, media, tools and sampling. "
                    "store, previous_response_id, conversation, background, include, built-in tools: 400 "
                    "(docs/responses-api.md)."),
    "openai.completions": Operation(
        "OpenAI: legacy completions (text models)", "openai",
        {200: reply("the completion, or text_completion events with `stream: true`", "Completion",
                    also={SSE: STREAM})},
        INFERENCE_ERRORS,
        {JSON: {"schema": "CompletionRequest", "examples": {
            "text": {"value": {"model": "deepseek", "prompt": "Once upon a time", "max_tokens": 8}}}}}),
    "openai.transcriptions": Operation(
        "OpenAI: transcribe audio", "openai",
        {200: reply("the text (JSON, or plain text with response_format=text)", "Transcription",
                    also={"text/plain": {"type": "string"}})},
        INFERENCE_ERRORS, {FORM: {"schema": "TranscriptionForm"}}),
    "openai.image_generations": Operation(
        "OpenAI: images from text (text_to_image models)", "openai",
        {200: reply("the images, inline", "ImagesResponse")}, INFERENCE_ERRORS,
        {JSON: {"schema": "ImageGenerationRequest", "examples": {
            "image": {"value": {"model": "flux", "prompt": "a red fox in the snow", "size": "64x64",
                                "num_inference_steps": 2}}}}}),
    "openai.image_edits": Operation(
        "OpenAI: edit an image (image_edit models)", "openai",
        {200: reply("the edited images, inline", "ImagesResponse")}, INFERENCE_ERRORS,
        {FORM: {"schema": "ImageEditForm"}}),
    # ------------------------------------------------------------ operators (utils/api/admin.py)
    "admin.memory_status": Operation("RAM and GPU memory, budgets, pressure", "admin",
                                     {200: reply("memory now", "MemoryStatus")}),
    "admin.model_status": Operation("Every model's state, memory and engine", "admin",
                                    {200: reply("models now", "ModelStatus")}),
    "admin.load_model": Operation(
        "Load a model now (also retries a failed one); ?device moves it", "admin",
        {200: reply("loaded", "Loaded")}, (400, 404, 409, 503),
        params=[path_param("key", "the model's key"),
                query("device", {"type": "string", "pattern": DEVICE_RE.pattern}, "cpu, cuda:N or mps"), ADMIN_WAIT],
        models_in=("key",)),
    "admin.unload_model": Operation(
        "Unload a model; waits for its requests (?wait) or answers 409", "admin",
        {200: reply("unloaded (false: it was not loaded)", "Unloaded")}, (400, 404, 409),
        params=[path_param("key", "the model's key"), ADMIN_WAIT], models_in=("key",)),
    "admin.reload_config": Operation(
        "Re-read models.yaml and the environment", "admin", {200: reply("what changed", "Reloaded")}, (400,),
        description="An invalid file changes nothing: 400 naming the key."),
    "admin.emergency_cleanup": Operation("Unload every idle model, release caches, purge expired temp files",
                                         "admin", {200: reply("what was freed", "Cleanup")}),
    "admin.temp_status": Operation("Temp files of requests", "admin", {200: reply("temp now", "TempStatus")}),
    "admin.jobs_status": Operation(
        "Jobs by state and the most recent ones", "admin", {200: reply("jobs now", "JobsStatus")}, (400,),
        params=[query("limit", {"type": "integer", "minimum": 1, "maximum": 200})]),
    "admin.cleanup_temp": Operation(
        "Remove expired temp files (all unheld ones with ?force=true)", "admin",
        {200: reply("what was removed", "TempSweep")},
        params=[query("force", {"type": "string"}, "1, true or yes: every temp file no request holds")]),
    "admin.profile": Operation(
        "Record the engines' operators and phases for a few seconds (torch.profiler)", "admin",
        {200: reply("a Chrome trace, gzip-compressed JSON (Perfetto and chrome://tracing load it)",
                    {"type": "string", "format": "binary"}, "application/gzip",
                    headers={"Content-Disposition": {"schema": {"type": "string"}}})},
        (400, 404, 409),
        params=[{**query("seconds", {"type": "number", "minimum": 0.01},
                         "how long to record (at most the server's profile_max_seconds)"), "required": True},
                query("model", {"type": "string"}, "only this model's engine (it must be loaded: else 409)")],
        models_in=("model",), maxima={"seconds": "profile_max_seconds"},
        description="Forward passes and the engine's own phases (engine.join, engine.prefill, engine.step, "
                    "engine.forward, engine.sample, engine.emit, ...) as named ranges, on the engine threads of every "
                    "loaded model or of ?model=. One at a time: a second request while one records gets 409."),
    "metrics.metrics": Operation(
        "Prometheus metrics (OpenMetrics when the scraper asks for it)", "service",
        {200: reply("the registry", {"type": "string"}, "text/plain",
                    also={"application/openmetrics-text": {"type": "string"}})}),
    # ------------------------------------------------------------ pages (utils/api/dashboard.py, openapi)
    "dashboard.bare": Operation("The dashboard: redirects to /admin/", "pages",
                                {302: {"description": "to /admin/",
                                       "headers": {"Location": {"required": True, "schema": {"type": "string"}}}}}),
    "dashboard.page": Operation("The dashboard page (holds no data: its script asks the JSON routes with the admin "
                                "token)", "pages", {200: reply("the page", {"type": "string"}, "text/html")}),
    "dashboard.asset": Operation(
        "The dashboard's script and style", "pages",
        {200: reply("the file", {"type": "string"}, "text/javascript", also={"text/css": {"type": "string"}})}, (404,),
        params=[path_param("name", "the file", {"enum": sorted(set(DASHBOARD_FILES) - {"index.html"})})]),
    "openapi.description": Operation("This description (OpenAPI 3.1)", "pages",
                                     {200: reply("the description", {"type": "object"})}),
    "swagger_ui.show": Operation(
        "/docs: the description rendered (Swagger UI, served from the package)", "pages",
        {200: reply("the page, or one of its files", {"type": "string"}, "text/html", also={"*/*": {}})}, (404,),
        params=[path_param("path", "a file of the page", {"enum": sorted(p.name for p in DOCS_FILES.iterdir())})]),
}
