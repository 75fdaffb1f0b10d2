"""What a family takes and gives back for one request: the request, its generation parameters and
its result. Shared by the engine (which queues and batches them) and the families (which run them),
so both import them from here, downward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationRequest:
    prompt: str
    system: str | None = None
    images: list[Any] = field(default_factory=list)   # PIL.Image.Image, RGB
    videos: list[Any] = field(default_factory=list)   # utils.media.decode.VideoClip
    audios: list[Any] = field(default_factory=list)   # float32 mono numpy arrays at the model's rate
    # A whole conversation instead of system + prompt: [{"role": system|user|assistant, "content":
    # [{"type": "text", "text": ...} | {"type": "image"|"video"|"audio"}]}]; media parts stand, in
    # order, for the items of `images`, `videos` and `audios`.
    messages: list[dict] | None = None
    raw: bool = False  # the prompt is plain text to continue, without the chat template (text models)
    # The client's field of each media item, per kind and in order ({"image": ["images[0]", ...]}).
    media_fields: dict[str, list[str]] = field(default_factory=dict)
    # (field, text) of every text the client wrote; None: the prompt, system and messages as they are.
    texts: list[tuple[str, str]] | None = None
    negative_prompt: str | None = None  # image families: what the image should not show
    # Per item, like media_fields: the client's options for it ({"max_pixels": ...}; utils/media/options.py).
    media_options: dict[str, list[dict]] = field(default_factory=dict)
    # OpenAI function tools ({"type": "function", "function": {...}}) the chat template renders; messages
    # may then also hold assistant "tool_calls" and "tool" turns (with "tool_call_id").
    tools: list[dict] | None = None
    # A raw prompt given as token ids (a legacy completion's `prompt` of integers): used as they are.
    prompt_ids: list[int] | None = None


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    do_sample: bool
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()   # generation ends where one of these appears; it is not returned
    # OpenAI's penalties over the generated tokens, token biases and min_p (utils/engine/sampling.py)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    min_p: float | None = None
    logprobs: int | None = None         # None: none; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for each prompt token (a completion's echo)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    finish_reason: str = "stop"   # "stop" | "length" | "cancelled" | "timeout"
    device: str | None = None     # where the model ran (cpu after a fallback, cuda:N, ...)
    images: list[bytes] | None = None   # image families: one PNG per image asked for
    segments: list[dict] | None = None  # speech_to_text: [{"start", "end", "text", "tokens", "words"?}], seconds
    language: str | None = None         # speech_to_text: the language transcribed (given or detected)
    duration: float | None = None       # speech_to_text: seconds of audio
    # Asked with params.logprobs / prompt_logprobs: per token {"token", "token_id", "logprob", "top": [...]}
    # (utils/engine/sampling.decoded); the prompt's first token has logprob None.
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict] | None = None
