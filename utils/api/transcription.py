"""/v1/audio/transcriptions on a speech_to_text model (Whisper): OpenAI's form -> a job checked
before any load, and the result -> each of OpenAI's response formats (json, text, verbose_json with
segments and words, srt, vtt). No Flask, no torch. Audio-family models (Qwen2-Audio, a chat model
told to transcribe) keep their own translation in utils/api/openai_translation.parse_transcription.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from utils.config.settings import ModelSpec
from utils.errors import InvalidInput, ModelUnavailable
from utils.families.speech_to_text import TranscriptionParams, compression_ratio
from utils.serving.inference import GenerateJob, MediaItem, number_field, parse_timeout, text_field

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")
# OpenAI fields that would change the answer and that this server does not do: refused, never ignored.
UNSUPPORTED = {"stream": ("", "false"), "include[]": ("",), "include": ("",), "chunking_strategy": ("", "auto")}


@dataclass(frozen=True)
class Transcription:
    """What the client asked for beyond the decoding: how the answer is written."""
    response_format: str
    granularities: tuple[str, ...]


@dataclass(frozen=True)
class Checkpoint:
    """What a Whisper checkpoint transcribes, from its generation_config.json (read before any load)."""
    languages: tuple[str, ...]   # ISO codes of its language tokens; () for an English-only model
    word_timestamps: bool        # it names cross-attention alignment heads


def checkpoint_facts(spec: ModelSpec) -> Checkpoint:
    path = Path(spec.path) / "generation_config.json"
    try:
        return _facts(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, TypeError, AttributeError):
        raise ModelUnavailable(f"'{spec.key}' has no readable generation_config.json in {Path(spec.path).name}/ "
                               f"(download it: python main.py --download-only --model {spec.key})") from None


@lru_cache(maxsize=64)
def _facts(path: str, mtime_ns: int) -> Checkpoint:
    config = json.loads(Path(path).read_text())
    languages = tuple(token[2:-2] for token in (config.get("lang_to_id") or {})) \
        if config.get("is_multilingual") else ()
    return Checkpoint(languages=languages, word_timestamps=bool(config.get("alignment_heads")))


def _values(form: Mapping, name: str) -> list[str]:
    getlist = getattr(form, "getlist", None)
    if getlist is not None:
        return [v for v in getlist(name) if v not in (None, "")]
    value = form.get(name)
    return [] if value in (None, "") else (list(value) if isinstance(value, (list, tuple)) else [value])


def parse(form: Mapping, audio: bytes, spec: ModelSpec) -> tuple[GenerateJob, Transcription]:
    """The form (multipart fields; `timestamp_granularities[]` may repeat) -> the job and the format.
    Every refusal names its field."""
    for name, neutral in UNSUPPORTED.items():
        for value in _values(form, name):
            if str(value).strip().lower() not in neutral:
                raise InvalidInput(f"'{name}' is not supported by this server (got {value!r})", field=name,
                                   error="unsupported parameter")
    response_format = str(form.get("response_format") or "json")
    if response_format not in RESPONSE_FORMATS:
        raise InvalidInput(f"'response_format' {response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                           field="response_format", error="unsupported parameter")
    granularities = tuple(dict.fromkeys(_values(form, "timestamp_granularities[]")
                                        + _values(form, "timestamp_granularities")))
    for value in granularities:
        if value not in GRANULARITIES:
            raise InvalidInput(f"'timestamp_granularities' {value!r} is not one of {', '.join(GRANULARITIES)}",
                               field="timestamp_granularities", error="unsupported parameter")
    if granularities and response_format != "verbose_json":
        raise InvalidInput("'timestamp_granularities' needs response_format verbose_json",
                           field="timestamp_granularities")
    facts = checkpoint_facts(spec)
    if "word" in granularities and not facts.word_timestamps:
        raise InvalidInput(f"timestamp granularity 'word' needs alignment heads, which '{spec.key}' does not name "
                           f"(generation_config.json); use 'segment'", field="timestamp_granularities",
                           error="unsupported parameter")
    language = _language(form.get("language"), facts, spec)
    prompt = text_field(form, "prompt", required=False, max_chars=spec.limits.max_prompt_chars)
    temperature = number_field(form, "temperature", integer=False, low=0.0, high=1.0, default=0.0)
    params = TranscriptionParams(
        max_new_tokens=spec.generation.max_new_tokens, temperature=temperature, language=language,
        timestamps=response_format in ("verbose_json", "srt", "vtt"), words="word" in granularities)
    job = GenerateJob(prompt=prompt or "", params=params, media=[MediaItem("audio", "file", audio)],
                      texts=[("prompt", prompt)] if prompt else [], timeout=parse_timeout(form))
    return job, Transcription(response_format, granularities or ("segment",))


def _language(value: Any, facts: Checkpoint, spec: ModelSpec) -> str | None:
    if value in (None, ""):
        return None
    code = str(value).strip().lower()
    known = facts.languages or ("en",)
    if code not in known:
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        raise InvalidInput(f"'language' {value!r} is not one of '{spec.key}''s languages (ISO 639-1 codes: {shown})",
                           field="language", error="unsupported language")
    return code if facts.languages else None  # an English-only model takes no language token


# ------------------------------------------------------------------ answers

def render(result: Any, options: Transcription) -> tuple[Any, str]:
    """(body, mimetype): a dict for the JSON formats, text for text, srt and vtt."""
    text, seconds = result.text.strip(), result.duration or 0.0
    usage = {"type": "duration", "seconds": int(math.ceil(seconds))}
    if options.response_format == "json":
        return {"text": text, "usage": usage}, "application/json"
    if options.response_format == "text":
        return text + "\n", "text/plain"
    segments = result.segments or []
    if options.response_format == "srt":
        return srt(segments), "application/x-subrip"
    if options.response_format == "vtt":
        return vtt(segments), "text/vtt"
    body: dict[str, Any] = {"task": "transcribe", "language": language_name(result.language),
                            "duration": round(seconds, 3), "text": text}
    if "segment" in options.granularities:
        body["segments"] = [{"id": i, "seek": int(round(s["start"] * 100)), "start": s["start"], "end": s["end"],
                             "text": s["text"], "tokens": s["tokens"], "temperature": 0.0,
                             "compression_ratio": compression_ratio(s["text"])}
                            for i, s in enumerate(segments)]
    if "word" in options.granularities:
        body["words"] = [word for s in segments for word in s.get("words", [])]
    body["usage"] = usage
    return body, "application/json"


def language_name(code: str | None) -> str | None:
    """OpenAI names the language in full ("english")."""
    if code is None:
        return None
    from transformers.models.whisper.tokenization_whisper import LANGUAGES  # deferred: transformers (a large table)
    return LANGUAGES.get(code, code)


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(max(0.0, seconds) * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[dict]) -> str:
    blocks = [f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n"
              for i, s in enumerate(segments, start=1)]
    return "\n".join(blocks)


def vtt(segments: list[dict]) -> str:
    blocks = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)
