"""`response_format` (json_object, json_schema) and forced tool calls (tool_choice required or a named
function) of an OpenAI body -> the Grammar its rows are constrained to (utils/engine/grammar.py).
No Flask, no torch: a schema that cannot be used is a 400 naming it here, before any lease.
"""
from __future__ import annotations

from typing import Any, Mapping

from utils.engine.grammar import Grammar
from utils.errors import InvalidInput

SCHEMA_FIELD = "response_format.json_schema.schema"


def parse_response_format(body: Mapping) -> Grammar | None:
    """None for text (or no response_format); InvalidInput for anything malformed or unusable."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return checked(Grammar("json", field="response_format"))
    if kind != "json_schema":
        raise InvalidInput("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}",
                           field="response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidInput("'json_schema' must be an object with 'name' and 'schema'", field="response_format.json_schema",
                           error="missing field")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidInput("'json_schema.name' is 1-64 characters", field="response_format.json_schema.name")
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise InvalidInput("'strict' must be true or false", field="response_format.json_schema.strict")
    schema = spec.get("schema", {})
    check_schema(schema, SCHEMA_FIELD)
    return checked(Grammar.json_schema(dict(schema), SCHEMA_FIELD))


def check_schema(schema: Any, field: str) -> None:
    """A JSON Schema at all (jsonschema's meta-schema check)."""
    import jsonschema  # deferred: jsonschema

    if not isinstance(schema, Mapping):
        raise InvalidInput("the schema must be a JSON Schema object", field=field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(f"not a valid JSON Schema: {exc.message}", field=field, error="invalid schema") from None


def checked(grammar: Grammar) -> Grammar:
    """The grammar, once it builds (no tokenizer needed: the schema's own errors surface here)."""
    try:
        grammar.build()
    except (RuntimeError, ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"this schema cannot be used for constrained decoding: {message[:400]}",
                           field=grammar.field, error="invalid schema") from None
    return grammar


def tool_call_grammar(tools: Any) -> Grammar | None:
    """The grammar of a forced choice (utils/api/openai_tools.ToolRequest): calls to the named function,
    or to any of the tools for "required", in the model's tool-call format; None for auto / none."""
    if tools is None or not tools.forced:
        return None
    chosen = [t["function"] for t in tools.tools if tools.choice == "required" or t["function"]["name"] == tools.name]
    return checked(Grammar.tool_calls(tools.format, [{"name": f["name"], "parameters": f.get("parameters")}
                                                     for f in chosen], tools.parallel))
