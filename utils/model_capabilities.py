"""What a model takes, read from its checkpoint folder: no weights, no torch, no transformers.

From config.json (model_type, architectures, sub-configs), the processor's configs
(processor_config.json, preprocessor_config.json, video_preprocessor_config.json), the tokenizer
config and the chat template, before any load:

    architecture   transformers' model_type (a diffusers folder: its pipeline class)
    family         the server family that architecture maps to, where that is unambiguous
    media          "image", "video", "audio": what the checkpoint's processor and model take
    max_images     images per request where the checkpoint bounds them (BLIP VQA: one)
    system_role    the chat template takes a system turn (Gemma's raise on one)
    chat_template  the folder holds one
    tool_format    how it writes tool calls (utils/tool_parsers.py), tool_call_tokens the markers

The routes refuse what a model does not take from this, before a lease (utils/inference.py
check_media_items); /v1/models and /admin/model_status show it. settings infer `family` from it when
models.yaml gives none. Read once per folder until its files change.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.tool_parsers import _TEMPLATE_MARKERS, checkpoint_tool_support

__all__ = ["Capabilities", "DEFAULT_MEDIA_LIMITS", "family_of_architecture", "infer_family", "media_limits",
           "narrowed_media", "read_capabilities"]

# Items per request when neither models.yaml (limits.max_images ...) nor the checkpoint bounds them.
DEFAULT_MEDIA_LIMITS = {"image": 4, "video": 1, "audio": 4}

# Architectures whose family is not the generic rule below (a causal LM is "text", a model with a
# vision tower is "vision_language").
_FAMILY_BY_ARCHITECTURE = {
    "blip": "vqa",
    "paligemma": "vqa",  # no chat template: a question in, an answer out
    "qwen2_audio": "audio",
    "qwen2_5_omni": "omni",
    "janus": "janus",
    "whisper": "speech_to_text",
}
# diffusers pipelines (model_index.json `_class_name`) that edit an input image; other pipelines draw.
_EDIT_PIPELINE = re.compile(r"(Edit|Img2Img|Inpaint)\w*Pipeline$")
# Processors that take video even where the folder has no video processor config of its own (older
# checkpoints saved only preprocessor_config.json; transformers builds the video processor from it).
_VIDEO_PROCESSORS = frozenset({"Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor", "Qwen2_5OmniProcessor",
                               "LlavaOnevisionProcessor", "LlavaNextVideoProcessor", "SmolVLMProcessor",
                               "InternVLProcessor", "Glm4vProcessor"})
# Architectures that answer about exactly one image.
_ONE_IMAGE = frozenset({"blip"})
_REFUSES_SYSTEM = re.compile(r"raise_exception\(\s*['\"][^'\"]*[Ss]ystem")


@dataclass(frozen=True)
class Capabilities:
    architecture: str | None
    family: str | None
    media: frozenset[str]
    max_images: int | None = None
    system_role: bool = True
    chat_template: bool = False
    tool_format: str | None = None
    renders_tools: bool = False
    tool_call_tokens: tuple[str, ...] = ()

    def public(self) -> dict:
        """As /v1/models and /admin/model_status show it."""
        return {"text": True, "images": "image" in self.media, "max_images": self.max_images,
                "video": "video" in self.media, "audio": "audio" in self.media, "system_role": self.system_role,
                "chat_template": self.chat_template, "tools": self.renders_tools, "tool_format": self.tool_format,
                "tool_call_tokens": list(self.tool_call_tokens)}


def read_capabilities(folder: str | Path) -> Capabilities | None:
    """The folder's capabilities; None when it holds neither config.json nor model_index.json (not
    downloaded yet)."""
    folder = Path(folder)
    stamp = tuple(_mtime(folder / name) for name in _FILES)
    if not (stamp[0] or stamp[1]):
        return None
    return _read(str(folder), stamp)


def narrowed_media(folder: str | Path, family_accepts: frozenset[str]) -> frozenset[str]:
    """What a family runs, narrowed to what the checkpoint in `folder` takes (all of it while the folder
    is not there: the load then fails first)."""
    capabilities = read_capabilities(folder)
    return family_accepts & capabilities.media if capabilities is not None else family_accepts


def media_limits(spec: Any, accepted: frozenset[str]) -> dict[str, int]:
    """Items of each kind one request may hold: models.yaml's limits where set, else what the checkpoint
    bounds, else DEFAULT_MEDIA_LIMITS; 0 for a kind not `accepted`."""
    capabilities = read_capabilities(spec.path)
    configured = {"image": spec.limits.max_images, "video": spec.limits.max_videos, "audio": spec.limits.max_audios}
    limits = {}
    for kind, value in configured.items():
        limit = DEFAULT_MEDIA_LIMITS[kind] if value is None else value
        if kind == "image" and capabilities is not None and capabilities.max_images is not None:
            limit = min(limit, capabilities.max_images)
        limits[kind] = limit if kind in accepted else 0
    return limits


def infer_family(folder: str | Path) -> str | None:
    capabilities = read_capabilities(folder)
    return capabilities.family if capabilities else None


def family_of_architecture(architecture: str | None, config: dict | None = None) -> str | None:
    """The server family of a model_type; `config` (config.json) decides the generic cases. None when
    it is not known or not unambiguous (then models.yaml must say `family`)."""
    if architecture in _FAMILY_BY_ARCHITECTURE:
        return _FAMILY_BY_ARCHITECTURE[architecture]
    config = config or {}
    classes = [str(name) for name in config.get("architectures") or []]
    vision = any(key in config for key in ("vision_config", "visual", "vision_tower", "image_token_id",
                                           "image_token_index"))
    audio = "audio_config" in config
    if config.get("auto_map") and not classes:
        return None
    if vision and not audio and (not classes or any(c.endswith(("ForConditionalGeneration", "ForImageTextToText"))
                                                    for c in classes)):
        return "vision_language"
    if classes and all(c.endswith("ForCausalLM") for c in classes) and not vision and not audio:
        return "text"
    return None


_FILES = ("config.json", "model_index.json", "processor_config.json", "preprocessor_config.json",
          "video_preprocessor_config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


@functools.lru_cache(maxsize=128)
def _read(folder_name: str, stamp: tuple) -> Capabilities:
    folder = Path(folder_name)
    index = _json(folder / "model_index.json")
    if index and not (folder / "config.json").is_file():  # a diffusers pipeline: text in, images out
        pipeline = str(index.get("_class_name") or "")
        family = "image_edit" if _EDIT_PIPELINE.search(pipeline) else ("text_to_image" if pipeline else None)
        return Capabilities(architecture=pipeline or None, family=family,
                            media=frozenset({"image"}) if family == "image_edit" else frozenset(), max_images=1
                            if family == "image_edit" else None)
    config = _json(folder / "config.json")
    architecture = config.get("model_type")
    processor = _json(folder / "processor_config.json")
    preprocessor = _json(folder / "preprocessor_config.json")
    media = set()
    if ("image_processor" in processor or "image_processor_type" in preprocessor
            or any(key in config for key in ("vision_config", "image_token_id", "image_token_index"))):
        media.add("image")
    if ("video_processor" in processor or (folder / "video_preprocessor_config.json").is_file()
            or processor.get("processor_class") in _VIDEO_PROCESSORS
            or preprocessor.get("processor_class") in _VIDEO_PROCESSORS):
        media.add("video")
    if ("feature_extractor" in processor or "feature_extractor_type" in preprocessor or "audio_config" in config):
        media.add("audio")
    family = family_of_architecture(architecture, config)
    if family == "speech_to_text":
        media = {"audio"}
    template = _chat_template(folder)
    tools = checkpoint_tool_support(folder) if template else None
    vocabulary = _added_tokens(folder)
    return Capabilities(
        architecture=architecture, family=family, media=frozenset(media),
        max_images=1 if architecture in _ONE_IMAGE else None,
        system_role=bool(template) and not _REFUSES_SYSTEM.search(template),
        chat_template=bool(template),
        tool_format=tools.format if tools else None, renders_tools=bool(tools and tools.renders_tools),
        tool_call_tokens=tuple(marker for marker, _ in _TEMPLATE_MARKERS if marker in vocabulary),
    )


def _chat_template(folder: Path) -> str:
    """The checkpoint's chat template(s) as one text ("" when it has none)."""
    found: list[str] = []
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        found.append(jinja.read_text(encoding="utf-8", errors="replace"))
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        template = _json(folder / name).get("chat_template")
        if isinstance(template, str):
            found.append(template)
        elif isinstance(template, list):  # [{"name": ..., "template": ...}]
            found += [t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    return "\n".join(found)


def _added_tokens(folder: Path) -> set[str]:
    decoder = _json(folder / "tokenizer_config.json").get("added_tokens_decoder")
    tokens = {t.get("content", "") for t in decoder.values() if isinstance(t, dict)} if isinstance(decoder, dict) else set()
    if not tokens:
        added = _json(folder / "tokenizer.json").get("added_tokens")
        tokens = {t.get("content", "") for t in added if isinstance(t, dict)} if isinstance(added, list) else set()
    return tokens


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
