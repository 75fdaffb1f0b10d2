"""OpenAI's API translated to ours and back: requests -> GenerateJob, results -> OpenAI's bodies and
stream chunks, errors -> OpenAI's error shape. No Flask, no torch: the /v1 blueprint calls these
around the same InferenceService that /generate uses.
"""
from __future__ import annotations

import base64
import re
import time
import uuid
from dataclasses import replace
from typing import Any, Iterator, Mapping

from utils.api import openai_choices as choices, openai_tools
from utils.config.settings import IMAGE_FAMILIES, ModelSpec, ServerSettings
from utils.errors import InvalidInput, ServerError, UnknownModel
from utils.families import accepted_media, capability_fields, family_class
from utils.media.decode import MAX_GIVEN_FRAMES
from utils.media.options import parse_media_options
from utils.serving.image_requests import is_image_model, parse_image_job
from utils.serving.inference import (GenerateJob, MediaItem, check_answers_prompts, check_media_items, parse_params,
                                     parse_timeout, text_field)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Parameters we do not implement: a value that would change the answer is refused, never ignored.
# (tools, tool_choice, parallel_tool_calls: utils/api/openai_tools.py; functions/function_call: OpenAI's
# deprecated form of them.)
# (n, logprobs, top_logprobs, echo: utils/api/openai_choices.py, per route.)
# audio, prediction, web_search_options, modalities other than text: answers this server does not make.
UNSUPPORTED = {"functions": None, "function_call": None, "suffix": None, "best_of": 1, "audio": None,
               "prediction": None, "web_search_options": None, "modalities": ["text"]}
# Sampling fields handed to parse_params as they are (the same names as on /generate).
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "top_k", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "logit_bias", "min_p")
MAX_STOPS = 4
# A transcription's `language`: ISO 639 letters, then BCP 47 subtags (pt-BR, zh_Hant): never free text.
LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,3}")
# `size` of an image request: ASCII digits only (str.isdigit() takes "²" and "①", which int() refuses).
SIZE = re.compile(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*")
TRANSCRIBE_PROMPT = "Transcribe the audio exactly, word for word."


def resolve_model(settings: ServerSettings, name: Any) -> str:
    """A model's key from `model` (its key, or its Hub repo id as an alias)."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("'model' is required: one of GET /v1/models", field="model", error="missing field")
    if name in settings.models:
        return name
    for key, spec in settings.models.items():
        if spec.repo_id == name:
            return key
    raise UnknownModel(f"no model named '{name}'; available: {', '.join(settings.models)}")


def model_card(spec: ModelSpec, created: int, loaded: bool) -> dict:
    return {"id": spec.key, "object": "model", "created": created, "owned_by": (spec.repo_id or "local").split("/")[0],
            "repo_id": spec.repo_id, "family": spec.family, "loaded": loaded, **capability_fields(spec)}


# ------------------------------------------------------------------ requests

def is_neutral(value: Any, neutral: Any) -> bool:
    """`value` is the neutral value itself: equal and of its type (true is not 1, false is not 0)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _refuse_unsupported(body: Mapping) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        empty = neutral is None and value in ({}, [])  # no tools, no logit_bias: as absent (not for best_of: {})
        if value is not None and not is_neutral(value, neutral) and not empty:
            raise InvalidInput(f"'{name}' is not supported by this server (only {neutral!r})", field=name,
                               error="unsupported parameter")


def _params(body: Mapping, spec: ModelSpec):
    """OpenAI's sampling fields -> our GenerationParams (validated by the same rules as /generate)."""
    _refuse_unsupported(body)
    ours: dict[str, Any] = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(limit_name) is not None:
        ours["max_new_tokens"] = body[limit_name]
    try:
        params = parse_params(ours, spec)
    except InvalidInput as exc:
        if exc.field == "max_new_tokens":
            exc.field, exc.details = limit_name, exc.details.replace("max_new_tokens", limit_name)
        raise
    return replace(params, stop=_stops(body.get("stop")))


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidInput("'stop' must be a non-empty string or a list of them", field="stop")
    if len(stops) > MAX_STOPS:
        raise InvalidInput(f"'stop' takes at most {MAX_STOPS} strings", field="stop")
    return tuple(stops)


def _url(part: Mapping, kind: str, where: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"'{kind}' needs a url (a data URL, or http(s) where enabled)", field=where)
    return url


def _parts(content: Any, where: str, media: list[MediaItem], texts: list[tuple[str, str]]) -> list[dict]:
    """One message's content -> our parts; media go to `media` and texts to `texts`, in order, with
    their field names."""
    if isinstance(content, str):
        texts.append((where, content))
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise InvalidInput("'content' must be a string or a non-empty list of parts", field=where)
    parts: list[dict] = []
    for i, part in enumerate(content):
        field = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append((f"{field}.text", part["text"]))
            parts.append({"type": "text", "text": part["text"]})
            continue
        if kind == "image_url":
            media.append(MediaItem("image", f"{field}.image_url", _url(part, "image_url", f"{field}.image_url"),
                                   parse_media_options(part, "image", field) or None))
        elif kind == "video_url":  # seed 004's options (fps, max_pixels...) sit beside video_url
            media.append(MediaItem("video", f"{field}.video_url", _url(part, "video_url", f"{field}.video_url"),
                                   parse_media_options(part, "video", field) or None))
        elif kind == "video":  # seed 004's form: the frames of one video, as image URLs
            frames = part.get("video")
            if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
                raise InvalidInput("'video' must be a list of frame image URLs (data URLs)", field=f"{field}.video")
            if len(frames) > MAX_GIVEN_FRAMES:
                raise InvalidInput(f"a video takes at most {MAX_GIVEN_FRAMES} frames", field=f"{field}.video")
            media.append(MediaItem("video", f"{field}.video", frames, parse_media_options(part, "video", field) or None))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str):
                raise InvalidInput("'input_audio' needs base64 'data' (and 'format')", field=f"{field}.input_audio")
            media.append(MediaItem("audio", f"{field}.input_audio.data", audio["data"]))
        elif kind == "audio_url":
            media.append(MediaItem("audio", f"{field}.audio_url", _url(part, "audio_url", f"{field}.audio_url")))
        else:
            raise InvalidInput(f"unknown content part type {kind!r} (text, image_url, video_url, video, "
                               f"input_audio)", field=f"{field}.type")
        parts.append({"type": media[-1].kind})
    return parts


def parse_chat(body: Mapping, spec: ModelSpec) -> tuple[GenerateJob, "openai_tools.ToolRequest | None"]:
    """A /v1/chat/completions body -> our job (a conversation, its media in order) and what it asks of
    tools (None without)."""
    if spec.family in IMAGE_FAMILIES:  # refused before the lease: the load alone is tens of GB
        route = "/v1/images/edits" if spec.family == "image_edit" else "/v1/images/generations"
        raise InvalidInput(f"'{spec.key}' makes images, not chat answers; use {route}", field="model",
                           error="unsupported model")
    check_answers_prompts(spec)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list", field="messages", error="missing field")
    media: list[MediaItem] = []
    texts: list[tuple[str, str]] = []
    turns: list[dict] = []
    tools = openai_tools.parse_tools(body, spec)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or message["role"] not in ROLES:
            raise InvalidInput(f"each message needs a role: one of {', '.join(ROLES)}", field=f"{where}.role")
        role = ROLES[message["role"]]
        content = message.get("content")
        calls = openai_tools.history_calls(message, where, texts) if role == "assistant" else None
        if content is None and role == "assistant":
            content = ""
        before = len(media)
        empty = calls and content in ("", [])  # an assistant turn of calls only
        parts = [] if empty else _parts(content, f"{where}.content", media, texts)
        if role != "user" and len(media) > before:
            raise InvalidInput(f"media go in user messages, not in {message['role']} ones", field=f"{where}.content")
        turn = {"role": role, "content": parts}
        if calls:
            turn["tool_calls"] = calls
        if role == "tool":
            turn["tool_call_id"] = openai_tools.tool_call_id(message, where)
        turns.append(turn)
    if turns[-1]["role"] not in ("user", "tool"):
        raise InvalidInput("the last message must be the user's (or a tool's result)",
                           field=f"messages[{len(turns) - 1}].role")
    openai_tools.check_history(turns, spec)
    rendered = openai_tools.tool_texts(tools) if tools is not None and tools.active else []
    texts += rendered
    text = "".join(p["text"] for turn in turns for p in turn["content"] if p["type"] == "text")
    text += "".join(t for _, t in rendered)
    if len(text) > spec.limits.max_prompt_chars:
        raise InvalidInput(f"the messages hold {len(text)} characters of text; this model takes at most "
                           f"{spec.limits.max_prompt_chars}", field="messages", error="value out of range")
    _check_text(text, "messages")
    check_media_items(media, spec, missing="messages")
    last = "".join(p["text"] for p in turns[-1]["content"] if p["type"] == "text")
    if body.get("echo") is not None and not is_neutral(body["echo"], False):
        raise InvalidInput("'echo' is taken on /v1/completions only", field="echo", error="unsupported parameter")
    params = replace(_params(body, spec), logprobs=choices.parse_chat_logprobs(body))
    job = GenerateJob(prompt=last, params=params, media=media, messages=turns, texts=texts,
                      stream=body.get("stream") is True, timeout=parse_timeout(body),
                      tools=list(tools.tools) if tools is not None and tools.active else None,
                      n=choices.parse_n(body, spec))
    return job, tools


def parse_completion(body: Mapping, spec: ModelSpec) -> list[GenerateJob]:
    """A legacy /v1/completions body (text models): each prompt is continued as it is. `prompt` is a
    string, a list of strings, a list of token ids, or a list of such lists: one job per prompt, each
    with the request's n (answered prompt-major: prompt 0's n choices, then prompt 1's)."""
    if spec.family != "text":
        raise InvalidInput(f"'{spec.key}' is not a text model; use /v1/chat/completions", field="model",
                           error="unsupported model")
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) not in (None, []):
            raise InvalidInput(f"'{name}' is taken on /v1/chat/completions only", field=name,
                               error="unsupported parameter")
    prompts = _prompts(body.get("prompt"), spec)
    n = choices.parse_n(body, spec, len(prompts))
    logprobs, echo = choices.parse_completion_logprobs(body), choices.parse_echo(body)
    if echo and any(ids is not None for _, ids in prompts):
        raise InvalidInput("'echo' with prompts given as token ids is not supported; send the prompt as text",
                           field="echo", error="unsupported parameter")
    params = replace(_params(body, spec), logprobs=logprobs, prompt_logprobs=logprobs if echo else None)
    stream, timeout = body.get("stream") is True, parse_timeout(body)
    return [GenerateJob(prompt=text, prompt_ids=ids, params=params, raw=True, stream=stream, timeout=timeout, n=n,
                        echo=echo, texts=[(where, text)] if text else [])
            for where, (text, ids) in zip(_prompt_fields(len(prompts), body.get("prompt")), prompts)]


def _prompt_fields(count: int, given: Any) -> list[str]:
    return ["prompt"] if count == 1 and not isinstance(given, list) else [f"prompt[{i}]" for i in range(count)]


def _prompts(value: Any, spec: ModelSpec) -> list[tuple[str, list[int] | None]]:
    """(text, token ids or None) of each prompt."""
    what = "a non-empty string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"'prompt' must be {what}", field="prompt")
    if len(value) > choices.MAX_PROMPTS:
        raise InvalidInput(f"'prompt' takes at most {choices.MAX_PROMPTS} prompts; got {len(value)}", field="prompt",
                           error="value out of range")
    out: list[tuple[str, list[int] | None]] = []
    for i, prompt in enumerate(value):
        where = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(prompt, list) and prompt and all(_is_id(v) for v in prompt):
            if len(prompt) > spec.limits.max_prompt_chars:
                raise InvalidInput(f"'{where}' holds {len(prompt)} tokens; this model takes at most "
                                   f"{spec.limits.max_prompt_chars}", field=where, error="value out of range")
            out.append(("", [int(v) for v in prompt]))
            continue
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput(f"'prompt' must be {what}", field=where)
        if len(prompt) > spec.limits.max_prompt_chars:
            raise InvalidInput(f"'{where}' is {len(prompt)} characters; this model takes at most "
                               f"{spec.limits.max_prompt_chars}", field=where, error="value out of range")
        _check_text(prompt, where)
        out.append((prompt, None))
    return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_transcription(form: Mapping, audio: bytes, spec: ModelSpec) -> tuple[GenerateJob, str]:
    """A /v1/audio/transcriptions form -> our job and the response format (json or text)."""
    if "audio" not in _accepted(spec):
        raise InvalidInput(f"'{spec.key}' does not take audio", field="model", error="unsupported model")
    response_format = form.get("response_format") or "json"
    if response_format not in ("json", "text"):
        raise InvalidInput("'response_format' must be json or text", field="response_format")
    instruction = TRANSCRIBE_PROMPT
    language = form.get("language") or None
    if language is not None and not (isinstance(language, str) and LANGUAGE.fullmatch(language)):
        raise InvalidInput(f"'language' is a language code such as en, pt-BR or yue (ISO 639, BCP 47); "
                           f"got {str(language)[:40]!r}", field="language")
    prompt = text_field(form, "prompt", required=False, max_chars=spec.limits.max_prompt_chars) or None
    texts = [(name, text) for name, text in (("language", language), ("prompt", prompt)) if text]  # the client's
    if language:
        instruction = f"Transcribe the audio exactly, word for word, in the language '{language}'."
    if prompt:
        instruction += f" Context: {prompt}"
    params = parse_params({"temperature": form.get("temperature") or 0}, spec)  # greedy unless asked
    return GenerateJob(prompt=instruction, params=params, media=[MediaItem("audio", "file", audio)],
                       texts=texts), response_format


def _accepted(spec: ModelSpec) -> frozenset[str]:
    return accepted_media(spec)


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("text is not valid Unicode (lone surrogate)", field=field) from None


# ------------------------------------------------------------------ images

# Extensions an image request may carry (extra_body in the openai client), validated as on /generate.
IMAGE_EXTENSIONS = ("seed", "negative_prompt", "num_inference_steps", "guidance_scale", "true_cfg_scale", "timeout",
                    "cfg_weight")
# OpenAI parameters we take only at their neutral value; anything else changes the answer: refused.
IMAGE_NEUTRAL = {"quality": (None, "auto", "standard"), "style": (None,), "background": (None, "auto"),
                 "output_format": (None, "png"), "output_compression": (None, 100, "100"),
                 "stream": (None, False, "false"), "partial_images": (None, 0, "0"), "mask": (None,),
                 "input_fidelity": (None,)}


def parse_image_request(body: Mapping, spec: ModelSpec, *, edit: bool, image: Any = None):
    """A /v1/images/generations (JSON) or /v1/images/edits (multipart) body -> our ImageJob: `n` is
    num_images, `size` "WxH" (or "auto") width and height; images come back as b64_json only."""
    family = spec.family
    draws = family_class(family).draws  # understands and draws (Janus): generations only
    if not (is_image_model(spec) or draws):
        raise InvalidInput(f"'{spec.key}' does not make images; image models: the text_to_image, image_edit and "
                           f"janus families (GET /v1/models)", field="model", error="unsupported model")
    if edit and family != "image_edit":
        raise InvalidInput(f"'{spec.key}' generates images from text; use /v1/images/generations", field="model",
                           error="unsupported model")
    if not edit and family != "text_to_image" and not draws:
        raise InvalidInput(f"'{spec.key}' edits an image; use /v1/images/edits with the image", field="model",
                           error="unsupported model")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise InvalidInput("this server returns images inline only: response_format b64_json (url is not served)",
                           field="response_format", error="unsupported parameter")
    for name, neutral in IMAGE_NEUTRAL.items():
        if not any(is_neutral(body.get(name), value) for value in neutral):
            allowed = ", ".join(repr(v) for v in neutral if v is not None) or "leave it out"
            raise InvalidInput(f"'{name}' is not supported by this server (only: {allowed})", field=name,
                               error="unsupported parameter")
    ours: dict[str, Any] = {name: body[name] for name in IMAGE_EXTENSIONS if body.get(name) not in (None, "")}
    ours["prompt"] = body.get("prompt")
    if body.get("n") not in (None, ""):
        ours["num_images"] = body["n"]
    size = body.get("size")
    if size not in (None, "", "auto"):
        match = SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise InvalidInput(f"'size' is WIDTHxHEIGHT in digits (e.g. 1024x768) or auto; got {str(size)[:40]!r}",
                               field="size")
        ours["width"], ours["height"] = (int(part) for part in match.groups())
    uploads = {"image": [image]} if image is not None else {}
    try:
        return parse_image_job(ours, uploads, spec)
    except InvalidInput as exc:
        renamed = {"num_images": "n", "width": "size", "height": "size"}.get(exc.field or "")
        if renamed:
            exc.details = exc.details.replace(f"'{exc.field}'", f"'{renamed}' ({exc.field})")
            exc.field = renamed
        raise


def images_response(outcome: Any) -> dict:
    """OpenAI's ImagesResponse; `seed` (an extension) reproduces the images."""
    params = outcome.params
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode("ascii")}
                                                  for png in outcome.images],
            "output_format": "png", "size": f"{params.width}x{params.height}", "seed": params.seed}


# ------------------------------------------------------------------ responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(results: Any, n: int = 1) -> dict:
    """Summed over the choices; each prompt's tokens counted once (results hold n choices per prompt)."""
    results = results if isinstance(results, list) else [results]
    prompt = sum(result.prompt_tokens for result in results[::n])
    completion = sum(result.completion_tokens for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: Any) -> str:
    """OpenAI's stop / length; a stream whose deadline passed ends with "timeout"."""
    return result.finish_reason if result.finish_reason in ("length", "timeout") else "stop"


def chat_response(key: str, results: list, tools: Any = None, spec: ModelSpec | None = None) -> dict:
    """A chat.completion with one choice per result (OpenAI's n), in order."""
    out = []
    for index, result in enumerate(results):
        content, calls = openai_tools.message_with_calls(result.text, tools, spec)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        if result.reasoning is not None:
            message["reasoning_content"] = result.reasoning
        finish = "tool_calls" if calls and finish_reason(result) == "stop" else finish_reason(result)
        out.append({"index": index, "message": message, "finish_reason": finish,
                    "logprobs": choices.chat_logprobs(result.logprobs) if result.logprobs is not None else None})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": key,
            "choices": out, "usage": usage(results, len(results))}


def completion_response(key: str, results: list, jobs: list | None = None) -> dict:
    """A text_completion: n choices per prompt, prompt-major, each with its index (OpenAI's order)."""
    n = len(results) // len(jobs) if jobs else 1
    out = []
    for index, result in enumerate(results):
        job = jobs[index // n] if jobs else None
        echo = job.prompt if job is not None and job.echo else ""
        choice: dict[str, Any] = {"index": index, "text": echo + result.text, "finish_reason": finish_reason(result),
                                  "logprobs": None}
        if result.logprobs is not None:
            entries = (result.prompt_logprobs or []) + result.logprobs if echo else result.logprobs
            choice["logprobs"] = choices.completion_logprobs(entries)
        if result.reasoning is not None:
            choice["reasoning_content"] = result.reasoning
        out.append(choice)
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": key,
            "choices": out, "usage": usage(results, n)}


class _LogprobsSent:
    """One streamed choice's logprob entries: what arrived with pieces and is not sent yet, and how
    many arrived (the rest comes from the result at the end)."""

    def __init__(self) -> None:
        self.pending: list = []
        self.received = 0

    def take(self, piece: Any) -> None:
        entries = getattr(piece, "logprobs", None) or []
        self.pending += entries
        self.received += len(entries)

    def flush(self, result: Any = None) -> list:
        out = self.pending + (list((result.logprobs or [])[self.received:]) if result is not None else [])
        self.pending = []
        return out


def chat_chunks(key: str, stream: Any, include_usage: bool, tools: Any = None,
                spec: ModelSpec | None = None) -> Iterator[dict]:
    """OpenAI's chat.completion.chunk objects for a stream of choices ((index, piece), (index, None)
    at a choice's end): per choice the role first, then content (reasoning between <think> tags goes
    to reasoning_content; tool calls as tool_calls deltas), its logprobs with it, its finish; then
    usage over all of them."""
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": key}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> dict:
        return dict(base, choices=[{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}])

    count = stream.count
    splitters = [ReasoningSplitter() for _ in range(count)]
    calls = [openai_tools.CallDeltas(tools, spec) for _ in range(count)]
    sent = [_LogprobsSent() for _ in range(count)]
    results: list = [None] * count
    for index in range(count):
        yield chunk(index, {"role": "assistant", "content": ""})
    for index, piece in stream:
        if piece is not None:
            sent[index].take(piece)
            for field, text in splitters[index].feed(piece):
                for delta in calls[index].feed(field, text):
                    entries = sent[index].flush() if "content" in delta and sent[index].pending else None
                    yield chunk(index, delta, logprobs=choices.chat_logprobs(entries) if entries else None)
            continue
        for delta in calls[index].finish():
            yield chunk(index, delta)
        result = results[index] = stream.result_of(index)
        finish = finish_reason(result) if result else "stop"
        entries = sent[index].flush(result) if result is not None and result.logprobs is not None else None
        yield chunk(index, {}, "tool_calls" if calls[index].called and finish == "stop" else finish,
                    choices.chat_logprobs(entries) if entries else None)
    if include_usage and all(result is not None for result in results):
        yield dict(base, choices=[], usage=usage(results, count))


def completion_chunks(key: str, stream: Any, include_usage: bool, jobs: list | None = None) -> Iterator[dict]:
    """text_completion chunks of a stream of choices; an echo sends its prompt first (with its
    logprobs when asked), then the pieces; each choice's finish; usage over all of them."""
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": key}
    count = stream.count
    n = count // len(jobs) if jobs else 1
    sent = [_LogprobsSent() for _ in range(count)]
    offsets = [0] * count
    echoed = [False] * count
    results: list = [None] * count

    def chunk(index: int, text: str, entries: list | None = None, finish: str | None = None) -> dict:
        logprobs = None
        if entries is not None:
            logprobs = choices.completion_logprobs(entries, offsets[index])
            offsets[index] += sum(len(e["token"]) for e in entries if e is not None)
        return dict(base, choices=[{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}])

    def echo(index: int, piece: Any, result: Any) -> Iterator[dict]:
        job = jobs[index // n] if jobs else None
        if echoed[index] or job is None or not job.echo:
            return
        echoed[index] = True
        prompt_entries = getattr(piece, "prompt_logprobs", None) or (result.prompt_logprobs if result else None)
        yield chunk(index, job.prompt, prompt_entries if job.params.logprobs is not None else None)

    for index, piece in stream:
        if piece is not None:
            yield from echo(index, piece, None)
            sent[index].take(piece)
            entries = sent[index].flush() if jobs and jobs[index // n].params.logprobs is not None else None
            yield chunk(index, str(piece), entries)
            continue
        result = results[index] = stream.result_of(index)
        yield from echo(index, None, result)
        entries = sent[index].flush(result) if result is not None and result.logprobs is not None else None
        yield chunk(index, "", entries or None, finish_reason(result) if result else "stop")
    if include_usage and all(result is not None for result in results):
        yield dict(base, choices=[], usage=usage(results, n))


class ReasoningSplitter:
    """Routes streamed text: inside <think>…</think> to reasoning_content, the rest to content; the
    tags themselves are not sent (each is one token, so it never straddles two pieces)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self.thinking = False

    def feed(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while piece:
            tag = self.CLOSE if self.thinking else self.OPEN
            before, found, piece = piece.partition(tag)
            if before:
                out.append(("reasoning_content" if self.thinking else "content", before))
            if found:
                self.thinking = not self.thinking
        return out


# ------------------------------------------------------------------ errors

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error"}


def error_body(status: int, error: str, details: str, field: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    code = "model_not_found" if error == "unknown model" else error.replace(" ", "_")
    return {"error": {"message": details or error, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": field, "code": code}}


def error_of(exc: ServerError) -> dict:
    return error_body(exc.status, exc.error, exc.details, exc.field)
