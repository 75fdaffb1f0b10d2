"""The component schemas of the description for one configuration: the pydantic models of
schemas.py as JSON Schema, the OpenAI parameters we take only at their neutral value (the parser's
own tables), and the bounds each configured model sets (limits.*, the model keys a route takes)."""
from __future__ import annotations

import copy
import functools
import math
from typing import Any, Iterable

from pydantic.json_schema import models_json_schema

from utils.api.openai_choices import MAX_N
from utils.api.openapi import schemas
from utils.families import accepted_media, family_class
from utils.api.openai_responses import NEUTRAL as RESPONSES_NEUTRAL
from utils.api.openai_translation import IMAGE_NEUTRAL, UNSUPPORTED
from utils.config.settings import IMAGE_FAMILIES, ModelSpec, ServerSettings

REF = "#/components/schemas/{model}"
EMPTY_IS_ABSENT = {name for name, neutral in UNSUPPORTED.items() if neutral is None}  # tools: [] = no tools
TEXT_BODIES = ("GenerateText", "GenerateTextForm")
IMAGE_BODIES = ("GenerateImage", "GenerateImageForm")
OPENAI_TEXT = ("ChatRequest", "CompletionRequest")
RESPONSES = ("ResponsesRequest",)
OPENAI_IMAGES = ("ImageGenerationRequest", "ImageEditForm")


@functools.cache
def _generated() -> dict[str, dict]:
    _, document = models_json_schema([(model, "validation") for model in schemas.MODELS], ref_template=REF)
    defs = document["$defs"]
    for schema in defs.values():
        _tidy(schema)
    for name in OPENAI_TEXT:
        defs[name]["properties"].update(_neutral_only({k: (v,) for k, v in UNSUPPORTED.items()}))
    for name in OPENAI_IMAGES:
        defs[name]["properties"].update(_neutral_only(IMAGE_NEUTRAL, form=name.endswith("Form")))
    for name in RESPONSES:
        defs[name]["properties"].update(_neutral_only(RESPONSES_NEUTRAL))
    return defs


def _tidy(schema: Any) -> None:
    """An optional field with a null default reads as what it is: a field to leave out (null is not
    sendable in a form anyway). Titles pydantic derives from names say nothing the name does not."""
    if isinstance(schema, list):
        for item in schema:
            _tidy(item)
        return
    if not isinstance(schema, dict):
        return
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, prop in properties.items():
            prop.pop("title", None)
            options = prop.get("anyOf")
            if "default" in prop and prop["default"] is None and isinstance(options, list):
                rest = [option for option in options if option != {"type": "null"}]
                del prop["default"], prop["anyOf"]
                if len(rest) == 1:
                    prop.update(rest[0])
                else:
                    prop["anyOf"] = rest
    for value in schema.values():
        _tidy(value)


def _neutral_only(table: dict[str, Iterable], form: bool = False) -> dict[str, dict]:
    """Parameters refused unless at their neutral value (never silently ignored). A form has no null:
    the ones whose only neutral value is null are left out of it."""
    out = {}
    for name, neutral in table.items():
        values = [value for value in neutral if value is not None]
        if form:
            values = [value for value in values if isinstance(value, str)]
            if values:
                out[name] = {"enum": values, "description": f"not supported: only {', '.join(values)}"}
        elif values:  # JSON: null is taken as absent
            out[name] = {"enum": [*values, None], "description": f"not supported: only {', '.join(map(repr, values))}"}
        else:
            out[name] = {"enum": [None, {}, []] if name in EMPTY_IS_ABSENT else [None],
                         "description": "not supported: leave it out"}
    return out


def component_schemas(settings: ServerSettings, *, show_models: bool) -> dict[str, dict]:
    """Every component for `settings`. show_models=False leaves model keys out (a caller who may not
    list the models reads the shape only)."""
    defs = copy.deepcopy(_generated())
    specs = list(settings.models.values())
    text = [spec for spec in specs if spec.family not in IMAGE_FAMILIES]
    images = [spec for spec in specs if spec.family in IMAGE_FAMILIES]
    if text:
        _bound(defs, RESPONSES, "max_output_tokens", maximum=_most(text, "max_new_tokens"))
        _bound(defs, TEXT_BODIES, "max_new_tokens", maximum=_most(text, "max_new_tokens"))
        _bound(defs, TEXT_BODIES, "prompt", maxLength=_most(text, "max_prompt_chars"))
        _bound(defs, TEXT_BODIES, "system", maxLength=_most(text, "max_prompt_chars"))
        _bound(defs, OPENAI_TEXT, "max_tokens", maximum=_most(text, "max_new_tokens"))
        _bound(defs, OPENAI_TEXT, "max_completion_tokens", maximum=_most(text, "max_new_tokens"))
        _bound(defs, OPENAI_TEXT, "n", maximum=min(MAX_N, max(spec.engine.max_queue for spec in text)))
    if images:
        multiple = math.lcm(*(family_class(spec.family).size_multiple for spec in images))
        side = {"minimum": multiple, "maximum": _most(images, "max_image_pixels") // multiple, "multipleOf": multiple}
        for name in ("prompt", "negative_prompt"):
            _bound(defs, IMAGE_BODIES + OPENAI_IMAGES, name, maxLength=_most(images, "max_prompt_chars"))
        _bound(defs, IMAGE_BODIES + OPENAI_IMAGES, "num_inference_steps", maximum=_most(images, "max_steps"))
        _bound(defs, IMAGE_BODIES, "num_images", maximum=_most(images, "max_images_out"))
        _bound(defs, OPENAI_IMAGES, "n", maximum=_most(images, "max_images_out"))
        _bound(defs, IMAGE_BODIES, "width", **side)
        _bound(defs, IMAGE_BODIES, "height", **side)
    if show_models:
        for name, fits in MODEL_FIELDS.items():
            _bound(defs, (name,), "model", enum=model_names(specs, fits, aliases=True))
    return defs


def _most(specs: list[ModelSpec], limit: str) -> int:
    return max(getattr(spec.limits, limit) for spec in specs)


def _bound(defs: dict, names: Iterable[str], field: str, **keywords: Any) -> None:
    for name in names:
        prop = defs[name]["properties"].get(field)
        if prop is not None and keywords.get("enum") != []:
            prop.update(keywords)


def model_names(specs: Iterable[ModelSpec], fits=lambda spec: True, *, aliases: bool = False) -> list[str]:
    """The keys (and, with aliases, the Hub ids /v1 takes for them) of the models that fit a route."""
    fitting = [spec for spec in specs if fits(spec)]
    names = [spec.key for spec in fitting]
    if aliases:
        names += sorted({spec.repo_id for spec in fitting if spec.repo_id} - set(names))
    return names


# Which models each /v1 body's `model` takes (the route refuses the others with 400).
MODEL_FIELDS = {
    "ChatRequest": lambda spec: spec.family not in IMAGE_FAMILIES,
    "CompletionRequest": lambda spec: spec.family == "text",
    "ResponsesRequest": lambda spec: spec.family not in IMAGE_FAMILIES,
    "TranscriptionForm": lambda spec: "audio" in accepted_media(spec.family),
    "ImageGenerationRequest": lambda spec: spec.family == "text_to_image",
    "ImageEditForm": lambda spec: spec.family == "image_edit",
}
