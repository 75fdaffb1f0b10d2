"""OpenAI's n, logprobs and echo, translated: the fields parsed (400 naming the field for anything out
of range), and the engine's logprob entries (utils/engine/sampling.decoded) written in OpenAI's two
shapes: chat's `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` and the legacy
completions' `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. No Flask, no torch.

Logprobs are those of the model's raw distribution (before penalties, temperature or top-p), as
vLLM's default (`logprobs_mode=raw_logprobs`) reports them.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from utils.errors import InvalidInput
from utils.serving.inference import number_field

MAX_N = 128                  # OpenAI's own cap on n
MAX_TOP_LOGPROBS = 20        # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions' logprobs
MAX_PROMPTS = 64             # prompts in one /v1/completions request


def parse_n(body: Mapping, spec: Any, prompts: int = 1) -> int:
    """`n`: 1..128 choices per prompt; all the rows (n x prompts) must fit the model's queue."""
    if isinstance(body.get("n"), bool):
        raise InvalidInput("'n' must be an integer; got a boolean", field="n")
    n = number_field(body, "n", integer=True, low=1, high=MAX_N, default=1)
    rows = n * prompts
    if rows > spec.engine.max_queue:
        raise InvalidInput(f"this request asks for {rows} rows (n={n} x {prompts} prompt(s)); '{spec.key}' queues at "
                           f"most {spec.engine.max_queue} (engine.max_queue)", field="n", error="value out of range")
    return n


def parse_chat_logprobs(body: Mapping) -> int | None:
    """Chat: `logprobs` true/false and `top_logprobs` 0..20 (which needs logprobs true) -> how many of
    the most likely tokens each position reports (None: no logprobs)."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidInput("'logprobs' must be true or false on /v1/chat/completions", field="logprobs")
    if top is not None:
        if isinstance(top, bool):
            raise InvalidInput("'top_logprobs' must be an integer", field="top_logprobs")
        top = number_field(body, "top_logprobs", integer=True, low=0, high=MAX_TOP_LOGPROBS, default=None)
        if not wanted:
            raise InvalidInput("'top_logprobs' needs 'logprobs': true", field="top_logprobs")
    return (top or 0) if wanted else None


def parse_completion_logprobs(body: Mapping) -> int | None:
    """Legacy completions: `logprobs` is the count 0..5 of the most likely tokens (null: none)."""
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput("'logprobs' on /v1/completions is a count (0..5), not true/false", field="logprobs")
    return number_field(body, "logprobs", integer=True, low=0, high=MAX_COMPLETION_LOGPROBS, default=None)


def parse_echo(body: Mapping) -> bool:
    value = body.get("echo")
    if value is not None and not isinstance(value, bool):
        raise InvalidInput("'echo' must be true or false", field="echo")
    return bool(value)


# ------------------------------------------------------------------ logprobs in OpenAI's shapes

def _token(entry: Mapping) -> dict:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode("utf-8"))}


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's ChoiceLogprobs for the generated tokens."""
    return {"content": [dict(_token(e), top_logprobs=[_token(t) for t in e["top"]]) for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[dict | None], offset: int = 0) -> dict:
    """The legacy Logprobs of `entries` (a prompt's first token has logprob None), text offsets from `offset`;
    each position's top_logprobs holds its k most likely tokens and the chosen one."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        if entry is None:
            continue
        tokens.append(entry["token"])
        offsets.append(offset)
        offset += len(entry["token"])
        values.append(entry["logprob"])
        if entry["logprob"] is None:  # a prompt's first token
            tops.append(None)
            continue
        top = {t["token"]: t["logprob"] for t in entry["top"]}
        top.setdefault(entry["token"], entry["logprob"])
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# ------------------------------------------------------------------ streams of several choices

class SingleChoice:
    """A one-row stream (LeasedStream, RemoteStream) seen as a stream of choices: (0, piece), then (0, None)."""

    count = 1

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.device = getattr(stream, "device", None)

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        for piece in self._stream:
            yield 0, piece
        yield 0, None

    def result_of(self, index: int) -> Any:
        return self._stream.result

    def close(self) -> None:
        self._stream.close()
