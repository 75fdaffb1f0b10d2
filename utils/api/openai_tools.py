"""OpenAI's function tools on /v1/chat/completions, translated: `tools`, `tool_choice`,
`parallel_tool_calls` validated (400 for anything malformed, before any lease), assistant `tool_calls`
and `tool` messages of the history checked for the chat template, and the generated text parsed back
into `tool_calls` (utils/api/tool_parsers.py), whole or as stream deltas. No Flask, no torch.

tool_choice: "auto" (the default with tools: the template renders them, the answer is parsed) and
"none" (tools not rendered, the answer not parsed). "required" and a named function need
grammar-constrained decoding and are refused with 400 until the engine has it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from utils.api.tool_parsers import FUNCTION_NAME, ToolCallStream, checkpoint_tool_support, parse
from utils.config.settings import ModelSpec
from utils.errors import InvalidInput
from utils.families import family_class

MAX_TOOLS = 128          # OpenAI's own limit
MAX_DESCRIPTION = 8192   # characters of one function's description
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


@dataclass(frozen=True)
class ToolRequest:
    """What a request asks of tools, validated."""
    tools: tuple[dict, ...]     # OpenAI's tool objects, normalised ({"type": "function", "function": {...}})
    choice: str                 # "auto" | "none"
    parallel: bool              # False: only the first call is returned
    format: str | None          # the model's tool-call format; None: not known yet (checkpoint not on disk)

    @property
    def active(self) -> bool:
        """Tools are rendered into the prompt and the answer is parsed for calls."""
        return self.choice != "none"

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]


def parse_tools(body: Mapping, spec: ModelSpec) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat body; None without tools."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidInput("'parallel_tool_calls' must be true or false", field="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise InvalidInput("'tool_choice' needs 'tools'", field="tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidInput("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", field="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidInput(f"'tools' takes at most {MAX_TOOLS} functions; got {len(tools)}", field="tools",
                           error="value out of range")
    normalised = tuple(_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in normalised]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise InvalidInput(f"two tools are named '{duplicate}'", field="tools")
    choice = _choice(choice, names)
    if choice != "none" and not _family_uses_template(spec):
        raise InvalidInput(f"'{spec.key}' has no chat template to render tools with", field="tools",
                           error="unsupported parameter")
    support = checkpoint_tool_support(spec.path)
    if choice != "none" and support is not None:
        if not support.renders_tools:
            raise InvalidInput(f"the chat template of '{spec.key}' does not render tools; use a model whose "
                               f"template does, or leave 'tools' out", field="tools", error="unsupported parameter")
        if support.format is None:
            raise InvalidInput(f"'{spec.key}' writes tool calls in a format this server does not parse",
                               field="tools", error="unsupported parameter")
    return ToolRequest(normalised, choice, parallel is not False, support.format if support else None)


def _family_uses_template(spec: ModelSpec) -> bool:
    return family_class(spec.family).uses_chat_template


def _tool(tool: Any, where: str) -> dict:
    if not isinstance(tool, Mapping) or tool.get("type") != "function":
        raise InvalidInput("each tool must be {\"type\": \"function\", \"function\": {...}} (function tools only)",
                           field=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise InvalidInput("'function' must be an object with a 'name'", field=f"{where}.function")
    unknown = set(function) - FUNCTION_KEYS
    if unknown:
        raise InvalidInput(f"unknown keys in a function: {', '.join(sorted(map(str, unknown)))} "
                           f"(known: {', '.join(sorted(FUNCTION_KEYS))})", field=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise InvalidInput("a function's 'name' is 1-64 letters, digits, '_', '-' or '.'",
                           field=f"{where}.function.name")
    out: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise InvalidInput(f"'description' must be a string of at most {MAX_DESCRIPTION} characters",
                               field=f"{where}.function.description")
        out["description"] = description
    parameters = function.get("parameters")
    if parameters is not None:
        out["parameters"] = _parameters(parameters, f"{where}.function.parameters")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidInput("'strict' must be true or false", field=f"{where}.function.strict")
    if strict:  # strict arguments need the grammar engine (decoding constrained to the schema)
        raise InvalidInput("'strict' function schemas are not supported yet (they need constrained decoding)",
                           field=f"{where}.function.strict", error="unsupported parameter")
    return {"type": "function", "function": out}


def _parameters(schema: Any, where: str) -> dict:
    """A JSON Schema of an object (jsonschema checks it is a schema at all)."""
    import jsonschema  # deferred: jsonschema

    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        raise InvalidInput("'parameters' must be a JSON Schema of an object ({\"type\": \"object\", ...})", field=where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(f"'parameters' is not a valid JSON Schema: {exc.message}", field=where) from None
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        raise InvalidInput("'parameters' must be plain JSON", field=where) from None
    return dict(schema)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none"):
        return choice
    if choice == "required":
        raise InvalidInput("'tool_choice': 'required' is not supported yet (it needs constrained decoding); use "
                           "'auto' or 'none'", field="tool_choice", error="unsupported parameter")
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        if name not in names:
            raise InvalidInput(f"'tool_choice' names {name!r}, which is not one of the tools", field="tool_choice")
        raise InvalidInput("a named 'tool_choice' is not supported yet (it needs constrained decoding); use "
                           "'auto' or 'none'", field="tool_choice", error="unsupported parameter")
    raise InvalidInput("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", field="tool_choice")


# ------------------------------------------------------------------ the history

def history_calls(message: Mapping, where: str, texts: list[tuple[str, str]]) -> list[dict] | None:
    """An assistant message's `tool_calls`, validated and normalised (arguments as JSON text);
    their names and arguments join the texts checked for special tokens."""
    calls = message.get("tool_calls")
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list):
        raise InvalidInput("'tool_calls' must be a list", field=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        field = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise InvalidInput("each tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                               "\"arguments\"}}", field=field)
        name, arguments, call_id = function.get("name"), function.get("arguments", "{}"), call.get("id")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise InvalidInput("a tool call needs its function's 'name'", field=f"{field}.function.name")
        if not isinstance(arguments, str):
            raise InvalidInput("'arguments' is the JSON text of the arguments (a string)",
                               field=f"{field}.function.arguments")
        try:
            json.loads(arguments)
        except ValueError:
            raise InvalidInput("'arguments' is not valid JSON", field=f"{field}.function.arguments") from None
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidInput("a tool call's 'id' must be a string", field=f"{field}.id")
        texts += [(f"{field}.function.name", name), (f"{field}.function.arguments", arguments)]
        out.append({"id": call_id or f"call_{j}", "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def tool_call_id(message: Mapping, where: str) -> str:
    value = message.get("tool_call_id")
    if not isinstance(value, str) or not value:
        raise InvalidInput("a tool message needs the 'tool_call_id' it answers", field=f"{where}.tool_call_id",
                           error="missing field")
    return value


def check_history(turns: list[dict], spec: ModelSpec) -> None:
    """Tool calls and tool results in the history need a template that renders them."""
    if not any(turn["role"] == "tool" or turn.get("tool_calls") for turn in turns):
        return
    support = checkpoint_tool_support(spec.path)
    if not _family_uses_template(spec) or support is not None and not support.renders_tools:
        where = next(i for i, turn in enumerate(turns) if turn["role"] == "tool" or turn.get("tool_calls"))
        raise InvalidInput(f"the chat template of '{spec.key}' does not render tool calls or tool results",
                           field=f"messages[{where}]", error="unsupported conversation")


def tool_texts(request: ToolRequest) -> list[tuple[str, str]]:
    """The tools as the template will render them (JSON), for the special-token check and the length."""
    return [(f"tools[{i}]", json.dumps(tool, ensure_ascii=False)) for i, tool in enumerate(request.tools)]


# ------------------------------------------------------------------ answers

def tool_format(request: ToolRequest, spec: ModelSpec) -> str | None:
    """The format to parse with (read again when the checkpoint was not on disk at validation)."""
    if request.format is not None:
        return request.format
    support = checkpoint_tool_support(spec.path)
    return support.format if support else None


def message_with_calls(text: str, request: ToolRequest | None, spec: ModelSpec) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer."""
    fmt = tool_format(request, spec) if request is not None and request.active else None
    if fmt is None:
        return text, []
    parsed = parse(fmt, text)
    calls = parsed.tool_calls if request.parallel else parsed.tool_calls[:1]
    return parsed.content, [call.to_openai() for call in calls]


def stream_with_calls(pieces: Iterator[tuple[str, str]], request: ToolRequest | None, spec: ModelSpec,
                      called: list[bool]) -> Iterator[dict]:
    """Deltas of the (field, text) pieces of a stream: content through the tool-call parser, other
    fields (reasoning_content) as they are. `called[0]` turns True once a call was sent."""
    deltas = CallDeltas(request, spec)
    for field, text in pieces:
        yield from deltas.feed(field, text)
        called[0] = deltas.called
    yield from deltas.finish()
    called[0] = deltas.called


class CallDeltas:
    """stream_with_calls for one choice, pushed a piece at a time (a stream of n choices interleaves them)."""

    def __init__(self, request: ToolRequest | None, spec: ModelSpec) -> None:
        fmt = tool_format(request, spec) if request is not None and request.active else None
        self._request = request
        self._stream = ToolCallStream(fmt) if fmt is not None else None
        self.called = False

    def feed(self, field: str, text: str) -> list[dict]:
        if self._stream is None or field != "content":
            return [{field: text}]
        return self._kept(self._stream.feed(text))

    def finish(self) -> list[dict]:
        return self._kept(self._stream.finish()) if self._stream is not None else []

    def _kept(self, deltas: list[dict]) -> list[dict]:
        out = []
        for delta in deltas:
            if "tool_calls" in delta:
                calls = [c for c in delta["tool_calls"] if self._request.parallel or c["index"] == 0]
                if not calls:
                    continue
                self.called = True
                delta = {"tool_calls": calls}
            out.append(delta)
        return out
