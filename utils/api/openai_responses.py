"""OpenAI's Responses API (POST /v1/responses) as a translation of the chat path: a Responses body
becomes a /v1/chat/completions body that `parse_chat` validates (so both routes take the same media,
tools and sampling, refused for the same reasons), the chat result becomes a Response object, and a
stream of pieces becomes Responses' typed events. Errors name the Responses field (`input[2].content[0]
.image_url`, not the chat message it turned into).

Nothing is stored: `store: true`, `previous_response_id`, `conversation`, `background` and the other
fields that need server-side state or tools we do not run are refused with 400 naming them.
No Flask, no torch.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

from utils.api import openai_tools, openai_translation as oa
from utils.config.settings import ModelSpec
from utils.errors import InvalidInput, ServerError

log = logging.getLogger("model_server.openai")

# The fields this route reads; anything else is refused (a field we do not know may change the answer).
TAKEN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "stream_options",
         "tools", "tool_choice", "parallel_tool_calls", "text", "metadata", "user", "safety_identifier",
         "prompt_cache_key",
         # extensions, as on /v1/chat/completions
         "seed", "top_k", "repetition_penalty", "timeout"}
# Fields taken at their neutral value only (None: absent). A value that needs stored state or tools we
# do not run is refused, never ignored.
NEUTRAL: dict[str, tuple] = {
    "store": (None, False),                 # nothing is stored: there is nothing to fetch by id later
    "previous_response_id": (None,),        # ...so no earlier response to continue: send the whole input
    "conversation": (None,),
    "background": (None, False),
    "include": (None, []),
    "reasoning": (None, {}),
    "prompt": (None,),                      # stored prompt templates
    "max_tool_calls": (None,),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),       # too long is a 400, never a silent cut
    "service_tier": (None, "auto", "default"),
    "prompt_cache_retention": (None,),
}
REASONS = {"store": "responses are not stored on this server (store: false)",
           "previous_response_id": "responses are not stored: send the whole conversation in 'input'",
           "conversation": "conversations are not stored: send the whole conversation in 'input'",
           "background": "background responses need storage; stream instead",
           "prompt": "stored prompt templates need storage; send the text in 'input'"}
IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")   # taken, change nothing
MAX_METADATA = 16                      # OpenAI's limits on metadata: 16 pairs, keys 64, values 512 characters
LOW_DETAIL_PIXELS = 512 * 512          # input_image detail "low": the image is shrunk to about this size
DETAILS = ("auto", "low", "high", "original")
ROLES = ("user", "system", "developer", "assistant")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


@dataclass
class ResponsesRequest:
    """A validated Responses body: the chat job and what the Response object echoes back."""
    job: Any
    tools: Any                                  # openai_tools.ToolRequest | None
    echo: dict = field(default_factory=dict)    # the request's settings as the Response object shows them


@dataclass
class _Origin:
    """Where chat message i came from in the Responses body, for error fields."""
    path: str                                   # "input[3]", "input", "instructions"
    kind: str                                   # "message", "text" (a plain string), "tool", "calls"
    calls: list[str] = field(default_factory=list)   # an assistant turn's tool calls: their input paths


# ------------------------------------------------------------------ requests

def parse_responses(body: Mapping, spec: ModelSpec) -> ResponsesRequest:
    """A /v1/responses body -> the chat job (parse_chat's validation) and the echo of its settings."""
    _refuse(body)
    origins: list[_Origin] = []
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidInput("'instructions' must be a string (a system message)", field="instructions")
        messages.append({"role": "system", "content": instructions})
        origins.append(_Origin("instructions", "text"))
    _input_messages(body.get("input"), messages, origins)
    chat: dict[str, Any] = {name: body[name] for name in ("model", "temperature", "top_p", "seed", "top_k",
                                                          "repetition_penalty", "timeout", "parallel_tool_calls")
                            if name in body}
    chat["messages"] = messages
    chat["stream"] = body.get("stream")
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text_format = _text_format(body.get("text"))
    if text_format is not None:
        chat["response_format"] = text_format
    try:
        job, tools = oa.parse_chat(chat, spec)
    except InvalidInput as exc:
        exc.field = _renamed(exc.field, origins)
        exc.details = exc.details.replace("max_completion_tokens", "max_output_tokens")
        raise
    # what is checked later (media decoding, special tokens at tokenization) names the Responses field too
    job.media = [replace(item, field=_renamed(item.field, origins)) for item in job.media]
    job.texts = [(_renamed(name, origins), text) for name, text in job.texts or []]
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "metadata": _metadata(body.get("metadata")),
            "temperature": job.params.temperature if job.params.do_sample else 0.0,  # greedy: as 0
            "top_p": job.params.top_p, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "tool_choice": body.get("tool_choice") or "auto", "tools": list(body.get("tools") or []),
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "user": body.get("user")}
    return ResponsesRequest(job, tools, echo)


def _refuse(body: Mapping) -> None:
    unknown = sorted(str(name) for name in body if name not in TAKEN and name not in NEUTRAL)
    if unknown:
        raise InvalidInput(f"unknown parameter '{unknown[0]}' for /v1/responses (docs/responses-api.md lists what "
                           f"is taken)", field=unknown[0], error="unsupported parameter")
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if {} in neutral and isinstance(value, Mapping) and all(v is None for v in value.values()):
            continue  # reasoning: {"effort": null}
        if not any(oa.is_neutral(value, allowed) for allowed in neutral):
            allowed = ", ".join(json.dumps(v) for v in neutral if v is not None) or "leave it out"
            reason = REASONS.get(name, f"'{name}' is not supported by this server")
            raise InvalidInput(f"{reason}; '{name}' takes only: {allowed}", field=name, error="unsupported parameter")
    for name in IDENTIFIERS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidInput(f"'{name}' must be a string", field=name)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, Mapping) and set(options) <= {"include_obfuscation"}):
        raise InvalidInput("'stream_options' takes only include_obfuscation (true or false)", field="stream_options")


def _input_messages(value: Any, messages: list[dict], origins: list[_Origin]) -> None:
    """`input` (a string, or a list of items) -> chat messages, each with its origin."""
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        origins.append(_Origin("input", "text"))
        return
    if not isinstance(value, list) or not value:
        raise InvalidInput("'input' must be a string or a non-empty list of items (messages, function_call, "
                           "function_call_output)", field="input", error="missing field" if value is None else
                           "invalid input")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidInput("each input item must be an object", field=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise InvalidInput(f"a message's role is one of {', '.join(ROLES)}", field=f"{where}.role")
            messages.append({"role": role, "content": _content(item.get("content"), role, f"{where}.content")})
            origins.append(_Origin(where, "message"))
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str) or (name != "arguments" and not item[name]):
                    raise InvalidInput(f"a function_call item needs '{name}' (a string)", field=f"{where}.{name}",
                                       error="missing field")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and origins[-1].kind in ("calls", "message"):
                last.setdefault("tool_calls", []).append(call)   # calls after an answer: one assistant turn
                origins[-1].calls.append(where)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(_Origin(where, "calls", [where]))
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = [_part(part, "tool", f"{where}.output[{j}]") for j, part in enumerate(output)]
            elif not isinstance(output, str):
                raise InvalidInput("'output' must be a string (or a list of input_text parts)", field=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
            origins.append(_Origin(where, "tool"))
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: chat templates leave it out of the history too
        elif kind == "item_reference":
            raise InvalidInput("item references need stored responses; send the item itself", field=f"{where}.type",
                               error="unsupported parameter")
        else:
            raise InvalidInput(f"input item type {kind!r} is not supported (taken: {', '.join(ITEM_TYPES)})",
                               field=f"{where}.type", error="unsupported parameter")
    if not messages:
        raise InvalidInput("'input' holds no message", field="input", error="missing field")


def _content(content: Any, role: str, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidInput("'content' must be a string or a non-empty list of parts", field=where)
    return [_part(part, role, f"{where}[{j}]") for j, part in enumerate(content)]


def _part(part: Any, role: str, where: str) -> dict:
    """One Responses content part -> the chat part (same index, so parse_chat's fields map back)."""
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise InvalidInput("files are not stored on this server; send the image as 'image_url' (a data URL)",
                               field=f"{where}.file_id", error="unsupported parameter")
        detail = part.get("detail")
        if detail is not None and detail not in DETAILS:
            raise InvalidInput(f"'detail' is one of {', '.join(DETAILS)}", field=f"{where}.detail")
        chat = {"type": "image_url", "image_url": part.get("image_url")}
        if detail == "low":  # OpenAI's low detail: a small version of the image (high, auto: the model's limits)
            chat["max_pixels"] = LOW_DETAIL_PIXELS
        return chat
    if kind == "input_file":
        raise InvalidInput("input_file is not supported (text and images only)", field=f"{where}.type",
                           error="unsupported parameter")
    raise InvalidInput(f"unknown content part type {kind!r} (input_text, input_image; output_text in assistant "
                       f"messages)", field=f"{where}.type")


def _tools(tools: Any) -> Any:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}."""
    if not isinstance(tools, list):
        return tools  # parse_chat says what 'tools' must be
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise InvalidInput(f"tool type {kind!r} is not supported: function tools only (built-in tools such as "
                               f"web_search and file_search are not run by this server)", field=f"tools[{i}].type",
                               error="unsupported parameter")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, Mapping):
        if choice.get("type") == "function" and set(choice) <= {"type", "name"}:
            return {"type": "function", "function": {"name": choice.get("name")}}
        raise InvalidInput("'tool_choice' is auto, none, required or {\"type\": \"function\", \"name\": ...} "
                           "(function tools only)", field="tool_choice", error="unsupported parameter")
    return choice


def _text_format(text: Any) -> dict | None:
    """`text.format` -> chat's response_format (json_schema's fields move under "json_schema")."""
    if text is None:
        return None
    if not isinstance(text, Mapping) or not set(text) <= {"format", "verbosity"}:
        raise InvalidInput("'text' takes 'format' (and 'verbosity': medium)", field="text")
    if text.get("verbosity") not in (None, "medium"):
        raise InvalidInput("'text.verbosity' is not supported (only 'medium')", field="text.verbosity",
                           error="unsupported parameter")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind not in ("json_object", "json_schema"):
        raise InvalidInput("'text.format' is {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                           "\"json_schema\", \"name\", \"schema\", \"strict\"}", field="text.format")
    if kind == "json_object":
        return {"type": "json_object", **{k: v for k, v in fmt.items() if k != "type"}}
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def _metadata(metadata: Any) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()):
        raise InvalidInput(f"'metadata' is at most {MAX_METADATA} string pairs (keys up to 64, values up to 512 "
                           f"characters)", field="metadata")
    return dict(metadata)


CHAT_FIELD = re.compile(r"messages\[(\d+)\](.*)")
CALL_FIELD = re.compile(r"\.tool_calls\[(\d+)\](.*)")
CALL_PARTS = {".function.name": ".name", ".function.arguments": ".arguments", ".id": ".call_id", ".function": ""}


def _renamed(name: str | None, origins: list[_Origin]) -> str | None:
    """A field of the chat body parse_chat saw -> the Responses field it came from."""
    if name is None:
        return None
    if name == "messages":
        return "input"
    if name == "max_completion_tokens":
        return "max_output_tokens"
    if name.startswith("response_format"):
        return "text.format" + name[len("response_format"):].replace(".json_schema", "")
    if name.startswith("tools[") and ".function" in name:
        return name.replace(".function", "", 1)
    match = CHAT_FIELD.fullmatch(name)
    if match is None or int(match[1]) >= len(origins):
        return name
    origin, rest = origins[int(match[1])], match[2]
    call = CALL_FIELD.fullmatch(rest)
    if call is not None and int(call[1]) < len(origin.calls):
        return origin.calls[int(call[1])] + CALL_PARTS.get(call[2], call[2])
    if origin.kind == "text":  # a plain string (input, instructions): the field is the string itself
        return origin.path
    if origin.kind == "tool":
        return origin.path + rest.replace(".content", ".output", 1).replace(".tool_call_id", ".call_id", 1)
    return origin.path + rest


# ------------------------------------------------------------------ Response objects

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(result: Any) -> dict:
    """Responses' usage. reasoning_tokens only when no reasoning was written (we do not count them apart)."""
    out = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
           "output_tokens": result.completion_tokens, "output_tokens_details": {},
           "total_tokens": result.prompt_tokens + result.completion_tokens}
    if not result.reasoning:
        out["output_tokens_details"]["reasoning_tokens"] = 0
    return out


def shell(key: str, request: ResponsesRequest) -> dict:
    """The Response object before any output: status in_progress."""
    return {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "model": key, "output": [],
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "truncation": "disabled", "usage": None, **request.echo}


def finish(response: dict, result: Any) -> dict:
    """Status, incomplete_details and usage from the generation's end."""
    reason = oa.finish_reason(result) if result is not None else "stop"
    if reason == "stop":
        response["status"] = "completed"
    else:  # length: the max_output_tokens; timeout (a stream past its deadline): an extension's reason
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens" if reason == "length" else reason}
    response["completed_at"] = int(time.time()) if reason == "stop" else None
    if result is not None:
        response["usage"] = usage(result)
    return response


def message_item(text: str, status: str = "completed") -> dict:
    return {"id": new_id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(text: str, status: str = "completed") -> dict:
    return {"id": new_id("rs"), "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def call_item(call: dict, status: str = "completed") -> dict:
    function = call["function"]
    return {"id": new_id("fc"), "type": "function_call", "status": status, "call_id": call["id"],
            "name": function["name"], "arguments": function.get("arguments", "")}


def response_body(key: str, result: Any, request: ResponsesRequest, spec: ModelSpec) -> dict:
    """The whole Response for a whole result: reasoning, the message (unless only calls), the calls."""
    content, calls = openai_tools.message_with_calls(result.text, request.tools, spec)
    response = finish(shell(key, request), result)
    status = "completed" if response["status"] == "completed" else "incomplete"
    output = []
    if result.reasoning:
        output.append(reasoning_item(result.reasoning, status))
    if content or not calls:
        output.append(message_item(content or "", status))
    output += [call_item(call) for call in calls]
    response["output"] = output
    return response


# ------------------------------------------------------------------ streams

class _Events:
    """Responses' typed events, numbered; the output items of the Response being built."""

    def __init__(self, response: dict) -> None:
        self.response = response
        self.sequence = 0
        self.open: dict | None = None          # the message or reasoning item text goes to now
        self.calls: dict[int, dict] = {}       # tool call index -> its function_call item (open until the end)

    def event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def snapshot(self, kind: str) -> dict:
        return self.event(kind, response=copy.deepcopy(self.response))  # events outlive the state they show

    def _add(self, item: dict) -> Iterator[dict]:
        self.response["output"].append(item)
        yield self.event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                         item=dict(copy.deepcopy(item), **({"content": []} if "content" in item else {})))

    def _index(self, item: dict) -> int:
        return next(i for i, other in enumerate(self.response["output"]) if other is item)

    def text(self, kind: str, delta: str) -> Iterator[dict]:
        """A piece of the answer (kind "message") or of its reasoning (kind "reasoning")."""
        if self.open is None or self.open["type"] != kind:
            yield from self.close_text("completed")
            self.open = message_item("", "in_progress") if kind == "message" else reasoning_item("", "in_progress")
            yield from self._add(self.open)
            yield self.event("response.content_part.added", item_id=self.open["id"], output_index=self._index(self.open),
                             content_index=0, part=dict(self.open["content"][0]))
        if not delta:
            return
        part = self.open["content"][0]
        part["text"] += delta
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        yield self.event(name, item_id=self.open["id"], output_index=self._index(self.open), content_index=0,
                         delta=delta, **extra)

    def close_text(self, status: str) -> Iterator[dict]:
        item, self.open = self.open, None
        if item is None:
            return
        index, part = self._index(item), item["content"][0]
        if item["type"] == "message":
            yield self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"], logprobs=[])
        else:
            yield self.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"])
        yield self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                         part=dict(part))
        item["status"] = status
        yield self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))

    def tool_calls(self, deltas: list[dict]) -> Iterator[dict]:
        for delta in deltas:
            item = self.calls.get(delta["index"])
            if item is None:  # a new call: its id and name come first, its arguments after
                yield from self.close_text("completed")
                item = self.calls[delta["index"]] = call_item(
                    {"id": delta["id"], "function": {"name": delta["function"]["name"], "arguments": ""}},
                    "in_progress")
                yield from self._add(item)
            arguments = delta.get("function", {}).get("arguments") or ""
            if arguments:
                item["arguments"] += arguments
                yield self.event("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=self._index(item), delta=arguments)

    def close_calls(self) -> Iterator[dict]:
        for item in self.calls.values():
            index = self._index(item)
            yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             name=item["name"], arguments=item["arguments"])
            item["status"] = "completed"
            yield self.event("response.output_item.done", output_index=index, item=dict(item))
        self.calls = {}


def response_events(key: str, stream: Any, request: ResponsesRequest, spec: ModelSpec) -> Iterator[dict]:
    """The events of a streamed response: created, in_progress, each output item (added, its content
    part, text deltas, done), then completed (or incomplete at max_output_tokens). A failure mid-way
    is an `error` event and then response.failed: the status line went out already."""
    events = _Events(shell(key, request))
    yield events.snapshot("response.created")
    yield events.snapshot("response.in_progress")
    try:
        splitter = oa.ReasoningSplitter()
        pieces = (item for piece in stream for item in splitter.feed(piece))
        for delta in openai_tools.stream_with_calls(pieces, request.tools, spec, [False]):
            if "tool_calls" in delta:
                yield from events.tool_calls(delta["tool_calls"])
            elif delta.get("content"):
                yield from events.text("message", delta["content"])
            elif delta.get("reasoning_content"):
                yield from events.text("reasoning", delta["reasoning_content"])
        response = finish(events.response, stream.result)
        if not response["output"]:  # nothing generated: an empty message, as the whole response has
            yield from events.text("message", "")
        yield from events.close_text("completed" if response["status"] == "completed" else "incomplete")
        yield from events.close_calls()
        yield events.snapshot("response.completed" if response["status"] == "completed" else "response.incomplete")
    except Exception as exc:  # noqa: BLE001 - reported in the stream, logged with its trace
        log.exception("response stream failed")
        error = oa.error_of(exc)["error"] if isinstance(exc, ServerError) else \
            oa.error_body(500, "generation failed", type(exc).__name__)["error"]
        yield events.event("error", code=error["code"], message=error["message"], param=error["param"])
        client_fault = isinstance(exc, ServerError) and exc.status < 500   # e.g. a template refusing the input
        events.response.update(status="failed", error={"code": "invalid_prompt" if client_fault else "server_error",
                                                       "message": error["message"]})
        yield events.snapshot("response.failed")
