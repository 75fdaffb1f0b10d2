"""The bodies of the API as pydantic models: documentation only, never used to validate (the routes
keep their own parsers: utils/serving/inference.py, utils/serving/image_requests.py, utils/api/openai_translation.py). Bounds that are
constants of those parsers are imported from them; the bounds each model sets (limits.*) are filled
in from the settings by `limits.py`; tests/test_openapi.py checks the others against the parsers.

pydantic 2 writes JSON Schema 2020-12, the dialect OpenAPI 3.1 uses, so each model is a component
as it is."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from utils.api.openai_responses import DETAILS as RESPONSE_DETAILS, ROLES as RESPONSE_ROLES
from utils.serving.image_requests import MAX_SCALE
from utils.serving.inference import MIN_TEMPERATURE, SEED_MAX
from utils.jobs.store import STATES
from utils.media.decode import MAX_GIVEN_FRAMES
from utils.api.openai_choices import MAX_COMPLETION_LOGPROBS, MAX_N, MAX_PROMPTS, MAX_TOP_LOGPROBS
from utils.api.openai_translation import MAX_STOPS, ROLES
from utils.api.tool_parsers import FUNCTION_NAME

# What the parsers check with literals of their own (utils/serving/inference.parse_params, parse_job):
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 1e-6
TOP_K_MAX = 100_000
REPETITION_PENALTY = (0.01, 10.0)
KEEP_ALIVE_MAX = 10 * 365 * 86400
TIMEOUT = (0.01, 86400.0)

File = Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]
Media = Annotated[str, Field(description="base64, or a data URL (data:image/png;base64,...); http(s) URLs only "
                                         "where REMOTE_MEDIA=1")]
NonEmpty = Annotated[str, Field(min_length=1)]
MediaList = Annotated[list[str], Field(description="a list of base64 strings or data URLs")]


class Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- errors

class ErrorBody(Doc):
    """Every error outside /v1."""
    error: str = Field(description="what went wrong, in a few words: invalid input, missing field, value out of "
                                   "range, unknown model, unauthorized, payload too large, model unavailable, ...")
    details: str = Field(description="the whole reason, naming the field and the limit")
    field: str | None = Field(None, description="the request field at fault, when one is")


class OpenAIErrorDetail(Doc):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_error, ...")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str = Field(description="our error in snake case; model_not_found for an unknown model")


class OpenAIError(Doc):
    """Every error under /v1: OpenAI's shape."""
    error: OpenAIErrorDetail


# ---------------------------------------------------------------- POST /generate/<model>, /jobs/<model>

class Sampling(Doc):
    max_new_tokens: int | None = Field(None, ge=1, description="1 .. the model's limits.max_new_tokens")
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX,
                                      description=f"0 = greedy, else at least {MIN_TEMPERATURE}; > 0 turns "
                                                  "sampling on unless do_sample says otherwise")
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=1.0)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="same seed + same request = same output")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI's: minus this times each "
                                            "token's count in what was generated so far")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI's: minus this for each token "
                                           "generated so far")
    logit_bias: dict[str, float] | None = Field(None, description="token id (digits) -> bias -100..100 added to its "
                                                "logit; at most 300 ids of the model's vocabulary")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="sampling keeps tokens at least min_p times as "
                                "likely as the likeliest")


class Common(Doc):
    keep_alive: float | None = Field(None, ge=-1, le=KEEP_ALIVE_MAX,
                                     description="seconds the model stays loaded after this request; 0 = unload "
                                                 "after it, -1 = keep")
    timeout: float | None = Field(None, ge=TIMEOUT[0], le=TIMEOUT[1],
                                  description="seconds this request may take; then 408 with what was generated")


class GenerateText(Sampling, Common):
    """Text out: families text, vision_language, vqa, audio, omni. Media only for the families that
    take them (GET /models): qwen_vl images and one video, blip_vqa one image, qwen_audio audio,
    qwen_omni any mix."""
    prompt: str = Field(description="at most the model's limits.max_prompt_chars")
    system: str | None = Field(None, description="a system message")
    image: Media | None = None
    images: MediaList | None = None
    audio: Media | None = None
    audios: MediaList | None = None
    video: Media | None = None
    videos: MediaList | None = None
    stream: bool | None = Field(None, description='server-sent events: data: {"text": ...} pieces, then data: [DONE]')


class GenerateImage(Common):
    """Images out: families text_to_image (flux) and image_edit (qwen_image_edit, which needs `image`)."""
    prompt: str
    negative_prompt: str | None = None
    image: Media | None = Field(None, description="the image to edit (image_edit models only)")
    num_inference_steps: int | None = Field(None, ge=1, description="1 .. the model's limits.max_steps")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    width: int | None = Field(None, description="a multiple of 16; width x height at most limits.max_image_pixels")
    height: int | None = None
    num_images: int | None = Field(None, ge=1, description="1 .. limits.max_images_out")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="drawn at random when left out; the answer says it")
    stream: Literal[False] | None = Field(None, description="images come whole: false or left out")


class GenerateTextForm(GenerateText):
    """The same fields as multipart/form-data: media as files (or base64 in text fields)."""
    image: File | None = None
    images: list[File] | None = None
    audio: File | None = None
    audios: list[File] | None = None
    video: File | None = None
    videos: list[File] | None = None


class GenerateImageForm(GenerateImage):
    image: File | None = None


class Usage(Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "timeout", "cancelled"]


class GenerateTextResult(Doc):
    response: str = Field(description="the answer; never the prompt echoed")
    model: str
    reasoning: str | None = Field(None, description="a reasoning model's <think> block")
    usage: Usage
    finish_reason: FinishReason


class ImageTimings(Doc):
    load_seconds: float
    queue_seconds: float
    generate_seconds: float
    total_seconds: float


class GenerateImageResult(Doc):
    images: list[str] = Field(description="base64 PNGs")
    model: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    timings: ImageTimings


# ---------------------------------------------------------------- jobs

class JobTimings(Doc):
    queue_seconds: float
    run_seconds: float | None = None


class JobResult(Doc):
    media_type: Literal["image/png", "application/json"]
    urls: list[str] = Field(description="GET these for the PNGs (?index=N) or the JSON answer")


class Job(Doc):
    job_id: str = Field(pattern="^[0-9a-f]{32}$")
    model: str
    status: Literal[STATES]
    created_at: str
    position: int | None = Field(None, description="queued: jobs ahead of it, plus one")
    progress: dict[str, Any] | None = Field(None, description="running: steps or tokens done")
    started_at: str | None = None
    finished_at: str | None = None
    timings: JobTimings
    attempts: int
    note: str | None = None
    error: str | None = None
    details: str | None = None
    result: JobResult | None = Field(None, description="succeeded: what it made and where to fetch it")


class JobPage(Doc):
    jobs: list[Job]
    next: int | None = Field(description="pass as ?before= for the next page; null on the last one")


# ---------------------------------------------------------------- service routes

class Health(Doc):
    status: Literal["ok"]
    models: dict[str, str] = Field(description="model key -> state")
    loaded: list[str]
    demo: bool


class Ready(Doc):
    status: Literal["ready", "not ready", "draining"]
    checks: dict[str, Any]
    reasons: list[str] | None = None
    preload_error: str | None = None
    preload_failed: dict[str, str] | None = None


class ModelEntry(Doc):
    key: str
    family: str
    repo_id: str | None


class ModelList(Doc):
    models: list[ModelEntry]


# ---------------------------------------------------------------- /admin

class ModelState(Doc):
    key: str
    family: str
    state: str
    loaded: bool


class ModelStatus(Doc):
    timestamp: float
    available_models: list[str]
    loaded_models: list[str]
    max_loaded_models: int
    models: dict[str, ModelState]
    settings: dict[str, Any]


class MemoryStatus(Doc):
    timestamp: float
    ram: dict[str, Any]
    gpu_available: bool
    gpus: list[dict[str, Any]]
    memory_warning: bool
    warnings: list[str]


class TempStatus(Doc):
    root: str
    files: int
    bytes: int
    active_scopes: int
    ttl_seconds: float
    max_total_bytes: int
    entries: list[dict[str, Any]]


class TempSweep(Doc):
    removed_files: int
    removed_bytes: int
    removed_entries: int
    remaining_bytes: int
    over_cap: bool


class JobsStatus(Doc):
    counts: dict[str, int]
    running: list[str]
    workers: int
    recent: list[Job]


class Loaded(Doc):
    loaded: Literal[True]
    model: dict[str, Any]


class Unloaded(Doc):
    unloaded: bool
    model: dict[str, Any]


class Reloaded(Doc):
    reloaded: Literal[True]
    models: dict[str, Any] = Field(description="added, removed, changed, reload_when_idle")
    server: list[str] = Field(description="settings applied")
    needs_restart: list[str] = Field(description="settings kept until a restart")


class Cleanup(Doc):
    unloaded_models: list[str]
    model_bytes_freed: int
    rss_freed: int
    temp: TempSweep
    kept_in_use: list[str]


# ---------------------------------------------------------------- /v1 (OpenAI)

class OpenAISampling(Doc):
    model: str = Field(description="a key of GET /v1/models, or its Hub id")
    max_tokens: int | None = Field(None, ge=1, description="1 .. the model's limits.max_new_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="as max_tokens; wins when both are set")
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX, description=f"0 or at least {MIN_TEMPERATURE}")
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=1.0)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX, description="extension")
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1],
                                             description="extension")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_STOPS)] | None = Field(
        None, description="generation ends there; the stop string is not returned")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (digits) -> bias -100..100")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension")
    n: int | None = Field(None, ge=1, le=MAX_N, description="choices per prompt; n x prompts rows must fit the "
                                                            "model's engine.max_queue")
    stream: bool | None = None
    stream_options: dict[str, bool] | None = Field(None, description="{\"include_usage\": true}: a last chunk "
                                                                     "with usage")
    timeout: float | None = Field(None, ge=TIMEOUT[0], le=TIMEOUT[1], description="extension: seconds")
    user: Any = Field(None, description="ignored (any value)")


class URL(Doc):
    url: str = Field(min_length=1, description="a data URL; http(s) only where REMOTE_MEDIA=1")


class TextPart(Doc):
    type: Literal["text"]
    text: str


class ImageURLPart(Doc):
    type: Literal["image_url"]
    image_url: URL | NonEmpty


class VideoURLPart(Doc):
    type: Literal["video_url"]
    video_url: URL | NonEmpty


class VideoFramesPart(Doc):
    type: Literal["video"]
    video: list[str] = Field(min_length=1, max_length=MAX_GIVEN_FRAMES, description="one video's frames as image "
                                                                                   "data URLs")


class InputAudio(Doc):
    data: str = Field(description="base64")
    format: str | None = Field(None, description="wav, mp3, ...")


class InputAudioPart(Doc):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(Doc):
    type: Literal["audio_url"]
    audio_url: URL | NonEmpty


Part = Annotated[Union[TextPart, ImageURLPart, VideoURLPart, VideoFramesPart, InputAudioPart, AudioURLPart],
                 Field(discriminator="type")]


class ChatMessage(Doc):
    role: Literal[tuple(ROLES)] = Field(description="developer = system; media go in user messages")
    content: str | Annotated[list[Part], Field(min_length=1)] | None = Field(
        description="a string or a list of parts; null only for an assistant message")


class ChatRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the last one is the user's")
    logprobs: bool | None = Field(None, description="each generated token's logprob (of the raw distribution)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(OpenAISampling):
    """Text models only; each prompt is continued as it is (no chat template)."""
    prompt: NonEmpty | TokenIds | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
            description="one prompt, or a list: one choice per prompt and n, prompt-major")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="the k likeliest tokens too")
    echo: bool | None = Field(None, description="the prompt comes back before the answer (with its logprobs when "
                                                "logprobs is set); text prompts only")


class ChatMessageOut(Doc):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None = None


class ChatChoice(Doc):
    index: int
    message: ChatMessageOut
    finish_reason: str
    logprobs: dict | None = Field(description="{\"content\": [{token, logprob, bytes, top_logprobs}]} when asked")


class ChatCompletion(Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Doc):
    index: int
    text: str
    finish_reason: str
    logprobs: dict | None = Field(description="{tokens, token_logprobs, top_logprobs, text_offset} when asked")
    reasoning_content: str | None = None


class Completion(Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TranscriptionForm(Doc):
    file: File = Field(description="the audio: WAV, FLAC, MP3, OGG, M4A")
    model: str = Field(description="an audio-taking model (qwen_audio, qwen_omni)")
    prompt: str | None = None
    language: str | None = None
    response_format: Literal["json", "text"] | None = None
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX)


class TranscriptionUsage(Doc):
    type: Literal["tokens"]
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Transcription(Doc):
    text: str
    usage: TranscriptionUsage


class ImageRequestFields(Doc):
    model: str = Field(description="a text_to_image model (generations) or an image_edit model (edits)")
    prompt: str
    n: int | None = Field(None, ge=1, description="images: 1 .. limits.max_images_out")
    size: str | None = Field(None, pattern="^(auto|[0-9]{1,6}x[0-9]{1,6})$",
                             description="WIDTHxHEIGHT, multiples of 16, or auto")
    response_format: Literal["b64_json"] | None = Field(None, description="images come inline only")
    negative_prompt: str | None = Field(None, description="extension")
    num_inference_steps: int | None = Field(None, ge=1, description="extension: 1 .. limits.max_steps")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="extension")
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="extension")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="extension")
    timeout: float | None = Field(None, ge=TIMEOUT[0], le=TIMEOUT[1], description="extension")


class ImageGenerationRequest(ImageRequestFields):
    pass


class ImageEditForm(ImageRequestFields):
    image: File = Field(description="the image to edit (or one `image[]` part); `mask` is refused")


class ImageData(Doc):
    b64_json: str


class ImagesResponse(Doc):
    created: int
    data: list[ImageData]
    output_format: Literal["png"]
    size: str
    seed: int


class ModelCapabilities(Doc):
    """What the model takes, read from its checkpoint folder (config, processor, chat template)."""
    text: bool
    images: bool
    max_images: int | None
    video: bool
    max_videos: int | None
    audio: bool
    max_audios: int | None
    system_role: bool = Field(description="the chat template takes a system turn")
    chat_template: bool
    tools: bool = Field(description="the chat template renders `tools`")
    tool_format: str | None = Field(description="how it writes tool calls: hermes, mistral, llama3_json, deepseek")
    tool_call_tokens: list[str]
# ---------------------------------------------------------------- POST /v1/responses

class InputTextPart(Doc):
    type: Literal["input_text"]
    text: str


class InputImagePart(Doc):
    type: Literal["input_image"]
    image_url: NonEmpty = Field(description="a data URL; http(s) only where REMOTE_MEDIA=1 (file_id: not stored)")
    detail: Literal[RESPONSE_DETAILS] | None = Field(None, description="low: the image shrunk to about 512x512 "
                                                                        "pixels; the others: the model's limits")


class OutputTextPart(Doc):
    type: Literal["output_text"]
    text: str


ResponsePart = Annotated[Union[InputTextPart, InputImagePart, OutputTextPart], Field(discriminator="type")]


class InputMessage(Doc):
    type: Literal["message"] | None = None
    role: Literal[RESPONSE_ROLES] = Field(description="developer = system; images go in user messages")
    content: str | Annotated[list[ResponsePart], Field(min_length=1)]


class FunctionCallInput(Doc):
    """An earlier answer's call, sent back with its output."""
    type: Literal["function_call"]
    call_id: NonEmpty
    name: str = Field(pattern=FUNCTION_NAME.pattern)
    arguments: str = Field(description="the JSON text of the arguments")


class FunctionCallOutputInput(Doc):
    type: Literal["function_call_output"]
    call_id: NonEmpty = Field(description="the call it answers")
    output: str | Annotated[list[InputTextPart], Field(min_length=1)]


class FunctionTool(Doc):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME.pattern)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of an object")
    strict: bool | None = Field(None, description="true needs structured outputs")


class FunctionChoice(Doc):
    type: Literal["function"]
    name: str


class TextFormat(Doc):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object and json_schema: refused (400) until structured outputs land")
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Doc):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesRequest(Doc):
    """OpenAI's Responses API over the chat path: nothing is stored (see docs/responses-api.md)."""
    model: str = Field(description="a key of GET /v1/models, or its Hub id")
    input: NonEmpty | Annotated[list[Union[InputMessage, FunctionCallInput, FunctionCallOutputInput]],
                                Field(min_length=1)]
    instructions: str | None = Field(None, description="a system message before the input")
    max_output_tokens: int | None = Field(None, ge=1, description="1 .. the model's limits.max_new_tokens")
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX, description=f"0 or at least {MIN_TEMPERATURE}")
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=1.0)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX, description="extension")
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1],
                                             description="extension")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="extension")
    timeout: float | None = Field(None, ge=TIMEOUT[0], le=TIMEOUT[1], description="extension: seconds")
    stream: bool | None = Field(None, description="typed server-sent events (response.created ... response.completed)")
    stream_options: dict[str, bool] | None = None
    tools: list[FunctionTool] | None = Field(None, description="function tools only")
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16, description="echoed back in the response")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ResponseOutputText(Doc):
    type: Literal["output_text"]
    text: str
    annotations: list


class ResponseMessage(Doc):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[ResponseOutputText]


class ResponseFunctionCall(Doc):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningText(Doc):
    type: Literal["reasoning_text"]
    text: str


class ResponseReasoning(Doc):
    type: Literal["reasoning"]
    id: str
    summary: list
    content: list[ReasoningText]


class ResponsesUsage(Doc):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class ResponseObject(Doc):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[Annotated[Union[ResponseMessage, ResponseFunctionCall, ResponseReasoning],
                           Field(discriminator="type")]]
    usage: ResponsesUsage | None
    incomplete_details: dict[str, str] | None
    store: Literal[False]


class ModelCard(Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    repo_id: str | None
    family: str
    loaded: bool
    architecture: str | None = Field(description="transformers' model_type of the checkpoint (null: not downloaded)")
    capabilities: ModelCapabilities | None


class ModelCards(Doc):
    object: Literal["list"]
    data: list[ModelCard]


MODELS = [ErrorBody, OpenAIError, GenerateText, GenerateImage, GenerateTextForm, GenerateImageForm,
          GenerateTextResult, GenerateImageResult, Job, JobPage, Health, Ready, ModelList, ModelStatus, MemoryStatus,
          TempStatus, TempSweep, JobsStatus, Loaded, Unloaded, Reloaded, Cleanup, ChatRequest, CompletionRequest,
          ChatCompletion, Completion, TranscriptionForm, Transcription, ImageGenerationRequest, ImageEditForm,
          ImagesResponse, ModelCard, ModelCards, ResponsesRequest, ResponseObject]
