"""Request -> validated job -> media decoded -> leased model -> result. No Flask, no HTTP here.

The generate route and the OpenAI layer both end up in `InferenceService.generate`.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

from utils.config.settings import SEED_MAX, ModelSpec
from utils.engine.grammar import compile_grammar
from utils.errors import InvalidInput, RequestTimeout
from utils.families import (GenerationParams, GenerationRequest, GenerationResult, accepted_media, family_class,
                            media_limits)
from utils.hub.model_folder import read_capabilities
from utils.families.base import client_texts
from utils.families.special_tokens import SpecialTokenGuard
from utils.media import decode as media

MEDIA_FIELDS = {"image": "image", "images": "image", "video": "video", "videos": "video", "audio": "audio",
                "audios": "audio"}
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,15}://")
MIN_TEMPERATURE = 0.01  # below this, logits / temperature overflow to inf


@dataclass
class MediaItem:
    kind: str          # image | video | audio
    field: str         # as the client named it, e.g. "images[1]"
    payload: Any       # base64/data-URL str, or bytes from an upload
    options: dict | None = None  # fps / nframes / max_pixels / min_pixels (utils/media/options.py)


@dataclass
class GenerateJob:
    prompt: str
    params: GenerationParams
    system: str | None = None
    media: list[MediaItem] = field(default_factory=list)
    keep_alive: float | None = None
    stream: bool = False
    messages: list[dict] | None = None  # a conversation (see GenerationRequest.messages)
    raw: bool = False
    timeout: float | None = None  # the request's own deadline, seconds; None = the model's / server's
    texts: list[tuple[str, str]] | None = None  # (field, text) the client wrote (see GenerationRequest.texts)
    tools: list[dict] | None = None  # function tools the chat template renders (see GenerationRequest.tools)
    prompt_ids: list[int] | None = None  # a completion's prompt given as token ids (raw; see GenerationRequest)
    n: int = 1          # OpenAI's n: choices of this prompt (InferenceService.generate_choices)
    echo: bool = False  # a completion's echo: the prompt comes back before the answer


# ------------------------------------------------------------------ validation

def number_field(body: Mapping, name: str, *, integer: bool, low: float, high: float, default: Any) -> Any:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if isinstance(value, str):  # multipart form fields arrive as text
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise InvalidInput(f"'{name}' must be {'an integer' if integer else 'a number'}; got {body[name]!r}",
                               field=name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"'{name}' must be {'an integer' if integer else 'a number'}; "
                           f"got {type(value).__name__}", field=name)
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise InvalidInput(f"'{name}' must be an integer; got {value}", field=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"'{name}' must be finite", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"'{name}' must be between {low:g} and {high:g}; got {value}", field=name,
                           error="value out of range")
    return int(value) if integer else float(value)


def flag_field(body: Mapping, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidInput(f"'{name}' must be true or false; got {value!r}", field=name)


def text_field(body: Mapping, name: str, *, required: bool, max_chars: int) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"'{name}' is required", field=name, error="missing field")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string; got {type(value).__name__}", field=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"'{name}' is not valid Unicode text (lone surrogate)", field=name) from None
    if required and not value.strip():
        raise InvalidInput(f"'{name}' must not be empty", field=name, error="empty field")
    if len(value) > max_chars:
        raise InvalidInput(f"'{name}' is {len(value)} characters; this model takes at most {max_chars}",
                           field=name, error="value out of range")
    return value


def parse_params(body: Mapping, spec: ModelSpec) -> GenerationParams:
    defaults, limits = spec.generation, spec.limits
    temperature = number_field(body, "temperature", integer=False, low=0.0, high=2.0, default=None)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise InvalidInput(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE}; got {temperature}",
                           field="temperature", error="value out of range")
    do_sample_default = defaults.do_sample if temperature is None else temperature > 0
    do_sample = flag_field(body, "do_sample", do_sample_default)
    if temperature == 0 and do_sample:
        raise InvalidInput("'temperature' 0 means greedy decoding; it cannot be combined with do_sample=true",
                           field="temperature")
    return GenerationParams(
        max_new_tokens=number_field(body, "max_new_tokens", integer=True, low=1, high=limits.max_new_tokens,
                               default=defaults.max_new_tokens),
        temperature=temperature if temperature else defaults.temperature or 1.0,
        top_p=number_field(body, "top_p", integer=False, low=1e-6, high=1.0, default=defaults.top_p),
        top_k=number_field(body, "top_k", integer=True, low=0, high=100_000, default=defaults.top_k),
        do_sample=do_sample,
        repetition_penalty=number_field(body, "repetition_penalty", integer=False, low=0.01, high=10.0,
                                   default=defaults.repetition_penalty),
        seed=number_field(body, "seed", integer=True, low=0, high=SEED_MAX, default=defaults.seed),
        frequency_penalty=number_field(body, "frequency_penalty", integer=False, low=-2.0, high=2.0, default=0.0),
        presence_penalty=number_field(body, "presence_penalty", integer=False, low=-2.0, high=2.0, default=0.0),
        min_p=number_field(body, "min_p", integer=False, low=0.0, high=1.0, default=None) or None,
        logit_bias=logit_bias_field(body),
    )


MAX_LOGIT_BIAS = 300  # OpenAI's own cap on the entries of logit_bias


def logit_bias_field(body: Mapping) -> tuple[tuple[int, float], ...]:
    """`logit_bias`: {"token id": bias in -100..100}, OpenAI's form (a JSON object; in a form field, its
    text). The ids are checked against the model's vocabulary before the lease (decode_media)."""
    value = body.get("logit_bias")
    if value is None or value == {} or value == "":
        return ()
    if isinstance(value, str):  # a multipart form field
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInput("'logit_bias' must be a JSON object of token ids to biases",
                               field="logit_bias") from None
    if not isinstance(value, Mapping):
        raise InvalidInput("'logit_bias' must be an object mapping token ids (as strings) to biases from -100 "
                           "to 100", field="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidInput(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens; got {len(value)}",
                           field="logit_bias", error="value out of range")
    out = []
    for token, bias in value.items():
        where = f"logit_bias.{str(token)[:20]}"
        if not (isinstance(token, str) and re.fullmatch(r"[0-9]{1,9}", token)):
            raise InvalidInput(f"'logit_bias' keys are token ids in digits; got {str(token)[:20]!r}", field=where)
        out.append((int(token), number_field({where: bias}, where, integer=False, low=-100.0, high=100.0,
                                              default=0.0)))
    return tuple(sorted(out))


def check_token_ids(ids: list[tuple[str, int]], vocab_size: int | None, key: str) -> None:
    """Token ids the client gave (logit_bias keys, prompts as ids) must be in the model's vocabulary."""
    if vocab_size is None:
        return
    for where, token in ids:
        if not 0 <= token < vocab_size:
            raise InvalidInput(f"token id {token} is not in the vocabulary of '{key}' (0..{vocab_size - 1})",
                               field=where, error="value out of range")


def media_items(body: Mapping, uploads: Mapping[str, list[bytes]]) -> list[MediaItem]:
    items: list[MediaItem] = []
    for name, kind in MEDIA_FIELDS.items():
        value = body.get(name)
        if value is None or value == "":
            pass
        elif name.endswith("s"):  # list fields
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise InvalidInput(f"'{name}' must be a list of base64 strings or data URLs", field=name)
            items += [MediaItem(kind, f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items.append(MediaItem(kind, name, value))
        files = uploads.get(name, [])
        for i, data in enumerate(files):
            items.append(MediaItem(kind, name if len(files) == 1 and not name.endswith("s") else f"{name}[{i}]",
                                   data))
    return items


def parse_timeout(body: Mapping) -> float | None:
    """`timeout`: seconds this request may take; when they pass, generation stops (408 / "timeout")."""
    return number_field(body, "timeout", integer=False, low=0.01, high=86400, default=None)


def check_media_items(media: list[MediaItem], spec: ModelSpec, *, missing: str = "image") -> None:
    """Kinds and counts a model takes, checked before anything is decoded or any model is leased.
    `missing`: the field a refusal for too few images names."""
    family = family_class(spec.family)
    accepted = accepted_media(spec)  # the family's, narrowed to what the checkpoint takes
    limits = media_limits(spec)
    counts: dict[str, int] = {}
    for item in media:
        if item.kind not in accepted:
            raise InvalidInput(f"model '{spec.key}' does not take {item.kind} input "
                               f"(it takes: {', '.join(sorted(accepted)) or 'text only'})",
                               field=item.field, error="unsupported input")
        counts[item.kind] = counts.get(item.kind, 0) + 1
        if counts[item.kind] > limits[item.kind]:
            raise InvalidInput(f"model '{spec.key}' takes at most {limits[item.kind]} {item.kind}(s) per request",
                               field=item.field, error="too many media items")
        honoured = family_class(spec.family).media_options
        for name in item.options or {}:
            if name not in honoured:
                raise InvalidInput(f"model '{spec.key}' does not take '{name}' on its media (its processor "
                                   f"{'sizes them itself' if 'pixels' in name else 'takes the frames as sampled'})",
                                   field=f"{item.field.rsplit('.', 1)[0]}.{name}", error="unsupported parameter")
    if counts.get("image", 0) < family.min_images:
        raise InvalidInput(f"'{spec.key}' answers a question about an image: send it in 'image' (base64, a data URL "
                           f"or an upload)", field=missing, error="missing image")


def check_system_role(spec: ModelSpec, request: GenerationRequest) -> None:
    """A system turn to a model whose chat template refuses one (Gemma) is refused before the lease,
    naming the field (utils/hub/model_folder.py reads the template)."""
    capabilities = read_capabilities(spec.path)
    if capabilities is None or capabilities.system_role or not capabilities.chat_template or request.raw:
        return
    if request.messages is not None:
        where = next((f"messages[{i}]" for i, m in enumerate(request.messages) if m.get("role") == "system"), None)
    else:
        where = "system" if request.system else None
    if where:
        raise InvalidInput(f"model '{spec.key}' takes no system turn (its chat template refuses one): put the "
                           f"instructions in the user's message", field=where, error="unsupported input")


def check_answers_prompts(spec: ModelSpec) -> None:
    """A speech_to_text model transcribes (/v1/audio/transcriptions); prompts to it are refused unloaded."""
    if not family_class(spec.family).answers_prompts:
        raise InvalidInput(f"'{spec.key}' ({spec.family}) transcribes audio: use POST /v1/audio/transcriptions",
                           field="model", error="unsupported model")


def parse_job(body: Mapping, uploads: Mapping[str, list[bytes]], spec: ModelSpec) -> GenerateJob:
    """Validates a /generate body (JSON object or form fields) against the model's limits."""
    check_answers_prompts(spec)
    media = media_items(body, uploads)
    check_media_items(media, spec)
    keep_alive = number_field(body, "keep_alive", integer=False, low=-1, high=10 * 365 * 86400, default=None)
    if keep_alive is not None and -1 < keep_alive < 0:
        raise InvalidInput("'keep_alive' is -1 (keep loaded), 0 (unload after this request) or seconds",
                           field="keep_alive")
    return GenerateJob(
        prompt=text_field(body, "prompt", required=True, max_chars=spec.limits.max_prompt_chars),
        system=text_field(body, "system", required=False, max_chars=spec.limits.max_prompt_chars),
        params=parse_params(body, spec),
        media=media,
        keep_alive=keep_alive,
        stream=flag_field(body, "stream", False),
        timeout=parse_timeout(body),
    )


# ------------------------------------------------------------------ execution

class InferenceService:
    """Decodes a job's media, leases the model, runs its family adapter."""

    def __init__(self, manager: Any, media_limits: Any, on_result: Callable[[str, GenerationResult], None] = None,
                 fetch: Callable[[str, str], bytes] | None = None):
        self.manager = manager
        self.media_limits = media_limits
        self._on_result = on_result
        self._fetch = fetch or _no_remote_media
        self.special_tokens = SpecialTokenGuard()  # from the tokenizer files: checked before any lease

    def spec(self, key: str) -> ModelSpec:
        return self.manager.spec(key)

    def set_fetcher(self, fetch: Callable[[str, str], bytes]) -> None:
        """How media URLs are fetched (a config reload replaces it)."""
        self._fetch = fetch

    def decode_media(self, job: GenerateJob, spec: ModelSpec | None = None) -> GenerationRequest:
        """The client's text against the model's special tokens (from its tokenizer files), every
        media item's headers (per-item caps, the per-request budget, what the model's family cannot
        take), then the decoding; all before any model is leased."""
        limits = self.media_limits
        family = family_class(spec.family) if spec is not None else None
        request = GenerationRequest(prompt=job.prompt, system=job.system, messages=job.messages, raw=job.raw,
                                    texts=job.texts, tools=job.tools, prompt_ids=job.prompt_ids)
        if family is not None:  # the client's text first: it costs no media decoding
            self.special_tokens.check(spec, family, client_texts(request))
            check_system_role(spec, request)
            ids = [(f"logit_bias.{token}", token) for token, _ in getattr(job.params, "logit_bias", ())]
            ids += [("prompt", token) for token in job.prompt_ids or ()]
            if ids:
                tokens = self.special_tokens.tokens(spec, family)
                check_token_ids(ids, tokens.vocab_size if tokens else None, spec.key)
        payloads = [[self.media_bytes(frame, f"{item.field}[{i}]") for i, frame in enumerate(item.payload)]
                    if isinstance(item.payload, list) else self.media_bytes(item.payload, item.field)
                    for item in job.media]  # a list: a video given as its frames
        probes = [media.probe(item.kind, data, item.field, limits) for item, data in zip(job.media, payloads)]
        media.check_request_budget(probes, limits)
        if family is not None:
            for probe in probes:
                family.check_media_header(probe)
        loaders = {"image": (media.load_image, request.images), "audio": (media.load_audio, request.audios),
                   "video": (media.load_video, request.videos)}
        for item, data in zip(job.media, payloads):
            load, into = loaders[item.kind]
            if isinstance(data, list):
                frames = [media.load_image(frame, f"{item.field}[{i}]", limits) for i, frame in enumerate(data)]
                into.append(media.video_from_frames(frames, item.field, limits, options=item.options))
            elif item.kind == "video":
                into.append(load(data, item.field, limits, options=item.options))
            else:
                into.append(load(data, item.field, limits))
            if item.kind == "audio" and family is not None:
                family.check_audio_length(len(into[-1]), limits.audio_sampling_rate, item.field)
            request.media_fields.setdefault(item.kind, []).append(item.field)
            request.media_options.setdefault(item.kind, []).append(dict(item.options or {}))
        return request

    def media_bytes(self, payload: Any, field: str) -> bytes:
        """Uploads arrive as bytes, JSON media as base64 or data URLs, OpenAI parts may be URLs;
        each loader then checks emptiness and size."""
        if isinstance(payload, (bytes, bytearray)):
            return bytes(payload)
        if isinstance(payload, str) and URL_SCHEME.match(payload):  # the fetcher refuses all but http(s)
            return self._fetch(payload, field)
        return media.decode_base64(payload, field, self.media_limits.max_media_bytes)

    def generate(self, key: str, job: GenerateJob, is_gone: Callable[[], bool] | None = None,
                 track: Callable[[Any], None] | None = None) -> GenerationResult:
        """Runs the job on the model's engine; `is_gone` tells whether the client has left (its row
        then leaves the queue or stops); `track` gets the engine job (its progress: tokens so far)."""
        request = self.decode_media(job, self.spec(key))  # bad media fails before any model loads
        deadline = self._deadline(key, job)
        result = self.execute(key, request, job, deadline, is_gone, track)
        if self._on_result and result.finish_reason != "cancelled":
            self._on_result(key, result)
        if result.finish_reason == "timeout":
            raise RequestTimeout(f"the request's deadline ({deadline:g}s) passed after "
                                 f"{result.completion_tokens} tokens; generated so far: {result.text!r}",
                                 partial=result)
        return result

    def execute(self, key: str, request: GenerationRequest, job: GenerateJob, deadline: float,
                is_gone: Callable[[], bool] | None = None, track: Callable[[Any], None] | None = None
                ) -> GenerationResult:
        """The part that needs the model: lease, prepare, the engine's run. A Ray replica runs this
        with the request decoded by the front (utils/cluster/). `track` gets the engine job."""
        with self.manager.lease(key, keep_alive=job.keep_alive) as served:
            prepared = self._prepare(served, request, job)
            engine_job = served.engine.submit(prepared, job.params, timeout=deadline)
            if track:
                track(engine_job)
            result = served.engine.run(engine_job, is_gone)
            result.device = served.adapter.device
        return result

    def _deadline(self, key: str, job: GenerateJob) -> float:
        """The request's `timeout`, else its model's, else the server's request_timeout."""
        return job.timeout or self.spec(key).timeout or self.manager.settings.request_timeout

    def stream(self, key: str, job: GenerateJob) -> "LeasedStream":
        """Text pieces as generated; the lease is held until the stream ends or is closed. The
        request has started (left the queue) when this returns, so queue errors are still a status."""
        request = self.decode_media(job, self.spec(key))
        on_result = (lambda result: self._on_result(key, result)) if self._on_result else None
        return self.open_stream(key, request, job, self._deadline(key, job), on_result)

    def open_stream(self, key: str, request: GenerationRequest, job: GenerateJob, deadline: float,
                    on_result: Callable[[GenerationResult], None] | None = None) -> "LeasedStream":
        """The part of `stream` that needs the model (a Ray replica runs this one)."""
        def start(served: Any) -> Any:
            engine_job = served.engine.submit(self._prepare(served, request, job), job.params, streaming=True,
                                              timeout=deadline)
            served.engine.await_start(engine_job)
            return engine_job
        return self._stream_under_lease(key, job.keep_alive, start,
                                        lambda engine_job, release: LeasedStream(engine_job, release, on_result))

    def _stream_under_lease(self, key: str, keep_alive: Any, start: Callable[[Any], Any],
                            make_stream: Callable[[Any, Callable[[], None]], Any]) -> Any:
        """Leases the model and runs `start(served)` (submit, then wait until the engine took it); the
        stream made of what it returns releases the lease when it ends. A failure before that releases
        it at once, so a queue error is still the request's status."""
        lease = self.manager.lease(key, keep_alive=keep_alive)
        served = lease.__enter__()
        try:
            started = start(served)
        except BaseException:
            lease.__exit__(None, None, None)
            raise
        stream = make_stream(started, lambda: lease.__exit__(None, None, None))
        stream.device = served.adapter.device
        return stream

    def execute_images(self, key: str, request: GenerationRequest, params: Any, deadline: float,
                       keep_alive: float | None, is_gone: Callable[[], bool] | None = None,
                       track: Callable[[Any], None] | None = None) -> dict:
        """An image job on the model's engine: the result, steps done and the durations of its parts
        (utils/serving/image_requests.run_images; a Ray replica runs this one)."""
        began = time.monotonic()
        with self.manager.lease(key, keep_alive=keep_alive) as served:
            leased = time.monotonic()
            prepared = served.adapter.prepare_images(request)
            engine_job = served.engine.submit(prepared, params, timeout=deadline)
            if track:
                track(engine_job)
            result = served.engine.run(engine_job, is_gone)
        done = time.monotonic()
        started = engine_job.started_at or done
        return {"result": result, "steps_done": engine_job.step[0] if engine_job.step else 0,
                "load_seconds": leased - began, "queue_seconds": started - engine_job.submitted_at,
                "generate_seconds": done - started}

    # -- several choices of one request (OpenAI's n, a list of prompts): one lease, one group of rows

    def generate_choices(self, key: str, jobs: list[GenerateJob], n: int,
                         is_gone: Callable[[], bool] | None = None) -> list[GenerationResult]:
        """n choices of each job (prompt-major: job 0's n choices, then job 1's), batched together."""
        spec = self.spec(key)
        requests = [self.decode_media(job, spec) for job in jobs]
        deadline = self._deadline(key, jobs[0])
        results = self.execute_choices(key, requests, jobs, n, deadline, is_gone)
        for result in results:
            if self._on_result and result.finish_reason != "cancelled":
                self._on_result(key, result)
        late = next((result for result in results if result.finish_reason == "timeout"), None)
        if late is not None:
            raise RequestTimeout(f"the request's deadline ({deadline:g}s) passed after {late.completion_tokens} "
                                 f"tokens of a choice; generated so far: {late.text!r}", partial=late)
        return results

    def execute_choices(self, key: str, requests: list[GenerationRequest], jobs: list[GenerateJob], n: int,
                        deadline: float, is_gone: Callable[[], bool] | None = None) -> list[GenerationResult]:
        with self.manager.lease(key, keep_alive=jobs[0].keep_alive) as served:
            group = served.engine.submit_group(self._choice_rows(served, requests, jobs, n), timeout=deadline)
            results = served.engine.run_group(group, is_gone)
            for result in results:
                result.device = served.adapter.device
        return results

    def stream_choices(self, key: str, jobs: list[GenerateJob], n: int) -> "ChoiceStream":
        """(index, piece) of every choice as generated (index as in generate_choices)."""
        spec = self.spec(key)
        requests = [self.decode_media(job, spec) for job in jobs]
        on_result = (lambda result: self._on_result(key, result)) if self._on_result else None

        def start(served: Any) -> Any:
            group = served.engine.submit_group(self._choice_rows(served, requests, jobs, n), streaming=True,
                                               timeout=self._deadline(key, jobs[0]))
            served.engine.await_group(group)
            return group
        return self._stream_under_lease(key, jobs[0].keep_alive, start,
                                        lambda group, release: ChoiceStream(group, release, on_result))

    def _choice_rows(self, served: Any, requests: list[GenerationRequest], jobs: list[GenerateJob],
                     n: int) -> list[tuple[Any, GenerationParams]]:
        rows = []
        for request, job in zip(requests, jobs):
            prepared = self._prepare(served, request, job)  # once per prompt: its n rows share it
            rows += [(prepared, choice_params(job.params, i)) for i in range(n)]
        return rows

    @staticmethod
    def _prepare(served: Any, request: GenerationRequest, job: GenerateJob) -> Any:
        """Inputs for the model (processor, chat template) on the request's thread; refuses a
        prompt longer than the model's context before it takes a place in the queue."""
        prepared = served.adapter.prepare(request)
        if job.params.grammar is not None:  # compiled here, so a failure is this request's 400, not its batch's
            compile_grammar(served.adapter._tokenizer(), job.params.grammar, stop_ids=served.adapter._eos_ids())
        tokens = prepared.get("input_ids")  # speech_to_text prepares audio features: its prepare checks its prompt
        served.adapter.check_context(int(tokens.shape[1]) if tokens is not None else 0, job.params)
        return prepared


def choice_params(params: GenerationParams, index: int) -> GenerationParams:
    """Choice `index` of n: a seeded request's choices draw from seed, seed + 1, ... (different
    choices, each reproducible); unseeded or greedy choices keep the parameters as they are."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index) % (SEED_MAX + 1))


def result_body(key: str, result: GenerationResult) -> dict:
    """The answer of /generate (and of a text job) for a finished generation."""
    body = {"response": result.text, "model": key,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
            "finish_reason": result.finish_reason}
    if result.reasoning is not None:
        body["reasoning"] = result.reasoning
    return body


def _no_remote_media(url: str, field: str) -> bytes:
    raise InvalidInput("this server fetches no URLs; send the media as base64 or a data URL", field=field,
                       error="url refused")


class LeasedStream:
    """Text pieces of one engine job; the model's lease ends exactly once, when the pieces run out
    or the stream is closed (the row is cancelled first, and ends at the engine's next step)."""

    CANCEL_WAIT_SECONDS = 30.0

    def __init__(self, job: Any, end_lease: Callable[[], None],
                 on_result: Callable[[GenerationResult], None] | None = None) -> None:
        self._job = job
        self._end_lease = end_lease
        self._on_result = on_result
        self._lock = threading.Lock()
        self._ended = False
        self.result: GenerationResult | None = None  # set when the pieces ran out (token counts, finish)
        self.device: str | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            result = self.result = yield from self._job.pieces()
        finally:
            self.close()
        if result is not None and result.finish_reason != "cancelled" and self._on_result:
            self._on_result(result)

    def close(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        try:
            if not self._job.done:
                self._job.cancel()
                self._job.wait_done(self.CANCEL_WAIT_SECONDS)
        finally:
            self._end_lease()


class ChoiceStream:
    """(index, piece) of a group of rows; the lease ends exactly once, when every row has ended or
    the stream is closed (every row is cancelled first). `results` once the pieces ran out."""

    def __init__(self, group: Any, end_lease: Callable[[], None],
                 on_result: Callable[[GenerationResult], None] | None = None) -> None:
        self._group, self._end_lease, self._on_result = group, end_lease, on_result
        self._lock = threading.Lock()
        self._ended = False
        self.results: list[GenerationResult | None] = [None] * len(group.jobs)
        self.device: str | None = None

    @property
    def count(self) -> int:
        return len(self._group.jobs)

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        """(index, piece), and (index, None) when choice `index` has ended (then `result_of(index)`)."""
        try:
            for index, piece in self._group.pieces():
                if piece is None:
                    result = self.result_of(index)
                    if result is not None and result.finish_reason != "cancelled" and self._on_result:
                        self._on_result(result)
                yield index, piece
        finally:
            self.close()

    def result_of(self, index: int) -> GenerationResult | None:
        job = self._group.jobs[index]
        if job.error is not None:
            raise job.error
        self.results[index] = job.result
        return job.result

    def close(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        try:
            jobs = self._group.jobs
            if not all(job.done for job in jobs):
                self._group.cancel()
                for job in jobs:
                    job.wait_done(LeasedStream.CANCEL_WAIT_SECONDS)
        finally:
            self._end_lease()
