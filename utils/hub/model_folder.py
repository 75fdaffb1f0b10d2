"""What a model folder holds: the one module that answers it for the downloader, the settings (which
folder to serve from), the quantized cache and the admin reports. Which files of a Hub repo a load
needs (select_files), which weight files a folder's load reads, whether the checkpoint is complete
(checkpoint_state), its size, and the `.download.json` manifest a finished download wrote; and what
the model takes, read from its configs and chat template (read_capabilities, below), with the
tool-call format its template writes (checkpoint_tool_support). No torch, no transformers."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MANIFEST_NAME = ".download.json"
HF_DIR = Path(".cache") / "huggingface"  # huggingface_hub's per-folder metadata (local_dir downloads)

# What a load reads. `*.json` covers config, generation_config, tokenizer(_config), special_tokens_map,
# added_tokens, preprocessor/processor config, chat_template.json and the safetensors index.
ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.tiktoken",
                  "merges.txt", "vocab.*", "*.jinja", "spk_dict.pt")
# Copies of the weights in other formats, and their indexes: never needed next to safetensors.
IGNORE_PATTERNS = ("*.bin.index.json", "*.pt.index.json", "*.msgpack.index.json", "*.h5.index.json",
                   "onnx/*", "openvino/*", "coreml/*", "tflite/*", "mlx/*", "gguf/*", "original/*")
# A diffusers pipeline (model_index.json at the top): each component in its subfolder (transformer/,
# vae/, text_encoder/, tokenizer/, scheduler/, processor/). Files at the top other than model_index.json
# are single-file copies of the same weights (FLUX.1's flux1-schnell.safetensors, 24 GB): never needed.
PIPELINE_ALLOW_PATTERNS = ("model_index.json", "*/*.safetensors", "*/*.safetensors.index.json", "*/*.json",
                           "*/tokenizer.model", "*/spiece.model", "*/*.tiktoken", "*/merges.txt", "*/vocab.*",
                           "*/*.jinja")
PIPELINE_INDEX = "model_index.json"
# trust_remote_code models: the configuration_*.py / modeling_*.py / processing_*.py that auto_map names.
REMOTE_CODE_PATTERNS = ("*.py",)
# Used only when the repo has no *.safetensors at all.
BIN_PATTERNS = ("*.bin", "*.bin.index.json")
_BIN_EXCLUDE = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state*.bin")

STATES = ("not_downloaded", "partial", "downloaded")


@dataclass(frozen=True)
class FileSelection:
    files: tuple[str, ...]
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...]
    weights_format: str  # "safetensors" | "bin" | "none"


# ------------------------------------------------------------------------------------ file selection

def select_files(repo_files: Iterable[str], *, code: bool = False) -> FileSelection:
    """The files of a repo that a load needs; *.bin weights only when there is no *.safetensors; the
    repo's Python files only for a model with trust_remote_code (`code`)."""
    from huggingface_hub.utils import filter_repo_objects  # deferred: huggingface_hub (reads HF_* when imported)

    names = sorted(set(repo_files))
    if PIPELINE_INDEX in names:
        allow, ignore, fmt = PIPELINE_ALLOW_PATTERNS, IGNORE_PATTERNS, "safetensors"
    elif any(name.endswith(".safetensors") for name in names):
        allow, ignore, fmt = ALLOW_PATTERNS, IGNORE_PATTERNS, "safetensors"
    else:
        allow = ALLOW_PATTERNS + BIN_PATTERNS
        ignore = tuple(p for p in IGNORE_PATTERNS if p != "*.bin.index.json") + _BIN_EXCLUDE
        fmt = "bin" if any(name.endswith(".bin") and "/" not in name for name in names) else "none"
    if code:
        allow = allow + REMOTE_CODE_PATTERNS
    files = tuple(filter_repo_objects(names, allow_patterns=list(allow), ignore_patterns=list(ignore)))
    return FileSelection(files, allow, ignore, fmt)


# ------------------------------------------------------------------------------------ state on disk

def read_manifest(path: Path) -> dict | None:
    """The `.download.json` a finished download wrote, or None (absent or unreadable)."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def download_leftovers(path: Path) -> list[Path]:
    """`*.incomplete` temp files of interrupted downloads under <path>/.cache/huggingface."""
    hf_dir = Path(path) / HF_DIR
    return sorted(hf_dir.rglob("*.incomplete")) if hf_dir.is_dir() else []


def weight_files(path: Path) -> list[Path]:
    """The weight files a load of `path` reads: the shards an index names, else the single files.

    Safetensors first; *.bin only when the folder has no safetensors weights. A diffusers pipeline:
    those of every component its model_index.json lists that has a config (a model, not a tokenizer).
    """
    if (path / PIPELINE_INDEX).is_file():
        return pipeline_weight_files(path)
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(path.glob(f"*{suffix}.index.json"))
        if indexes:
            shards: set[str] = set()
            for index in indexes:
                try:
                    weight_map = json.loads(index.read_text()).get("weight_map") or {}
                    shards.update(str(v) for v in weight_map.values())
                except (OSError, ValueError, AttributeError):
                    weight_map = {}
                if not weight_map:  # unreadable or empty index: name a file that cannot exist
                    shards.add(f"<no weight_map in {index.name}>")
            return [path / shard for shard in sorted(shards)]
        singles = sorted(p for p in path.glob(f"*{suffix}") if p.is_file()
                         and not any(p.match(x) for x in _BIN_EXCLUDE))
        if singles:
            return singles
    return []


def pipeline_weight_files(path: Path) -> list[Path]:
    try:
        index = json.loads((path / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return [path / f"<unreadable {PIPELINE_INDEX}>"]
    files: list[Path] = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = path / name
        if (folder / "config.json").is_file() or not folder.is_dir():  # a model (tokenizers have no config)
            found = weight_files(folder) if folder.is_dir() else []
            files += found or [folder / "<no weights>"]
    return files


def size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def checkpoint_state(path: Path) -> str:
    """"not_downloaded" | "partial" | "downloaded", from the files on disk.

    downloaded: config.json and every weight file present and non-empty (the shards named by
    model.safetensors.index.json, or model.safetensors; *.bin only in a folder without safetensors),
    no `*.incomplete` leftovers under .cache/huggingface, and, when `.download.json` exists, every file
    it lists present with the listed size. partial: anything else that is not an empty folder.
    """
    path = Path(path)
    if not path.is_dir():
        return "not_downloaded"
    leftovers = download_leftovers(path)
    content = [p for p in path.iterdir() if p.name != ".cache"]
    if not content and not leftovers:
        return "not_downloaded"
    if leftovers or not ((path / "config.json").is_file() or (path / PIPELINE_INDEX).is_file()):
        return "partial"
    weights = weight_files(path)
    if not weights or any(not size_or_none(w) for w in weights):
        return "partial"
    manifest = read_manifest(path)
    if manifest is not None:
        for name, size in manifest["files"].items():
            on_disk = size_or_none(path / name)
            if on_disk is None or (size is not None and on_disk != size):
                return "partial"
    return "downloaded"


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the weight files present in `path` (what `weight_files` names); 0 when none."""
    return sum(size_or_none(w) or 0 for w in weight_files(Path(path)))


# ------------------------------------------------------------------------------------ capabilities
# What a model takes, read from its checkpoint folder: no weights, no torch, no transformers.
#
# From config.json (model_type, architectures, sub-configs), the processor's configs
# (processor_config.json, preprocessor_config.json, video_preprocessor_config.json), the tokenizer
# config and the chat template, before any load:
#
#     architecture   transformers' model_type (a diffusers folder: its pipeline class)
#     family         the server family that architecture maps to, where that is unambiguous
#     media          "image", "video", "audio": what the checkpoint's processor and model take
#     max_images     images per request where the checkpoint bounds them (BLIP VQA: one)
#     system_role    the chat template takes a system turn (Gemma's raise on one)
#     chat_template  the folder holds one
#     tool_format    how it writes tool calls (utils/api/tool_parsers.py), tool_call_tokens the markers
#
# The routes refuse what a model does not take from this, before a lease (utils/serving/inference.py
# check_media_items); /v1/models and /admin/model_status show it. settings infer `family` from it when
# models.yaml gives none. Read once per folder until its files change.

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


# Inside one_snapshot(): each folder's stamp as first read there ({folder: stamp}); None outside.
_SNAPSHOT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("model_folder_snapshot", default=None)


@contextlib.contextmanager
def one_snapshot():
    """Within it (one HTTP request: utils/api/wsgi.py), a folder's files are stat'ed once: a chat
    request's checks read its model's capabilities six times, eight stats each, which measured ~0.5 ms
    of the request (issue 29). A folder that changes meanwhile shows from the next request on; a
    folder not there yet (a download to come) is looked at again each time."""
    token = _SNAPSHOT.set({})
    try:
        yield
    finally:
        _SNAPSHOT.reset(token)


def read_capabilities(folder: str | Path) -> Capabilities | None:
    """The folder's capabilities; None when it holds neither config.json nor model_index.json (not
    downloaded yet)."""
    name = os.fspath(folder)
    seen = _SNAPSHOT.get()
    stamp = seen.get(name) if seen is not None else None
    if stamp is None:
        stamp = tuple(_mtime_of(os.path.join(name, file)) for file in _FILES)  # os.stat: pathlib costs more
    if not (stamp[0] or stamp[1]):
        return None
    if seen is not None:
        seen[name] = stamp
    return _read(str(Path(name)), stamp)


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
        edits = family == "image_edit"
        return Capabilities(architecture=pipeline or None, family=family, system_role=False,
                            media=frozenset({"image"}) if edits else frozenset(), max_images=1 if edits else None)
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
        tool_call_tokens=tuple(marker for marker, _ in _TOOL_MARKERS if marker in vocabulary),
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


# ------------------------------------------------------------------ which format a checkpoint writes

@dataclass(frozen=True)
class ToolSupport:
    renders_tools: bool        # its chat template uses `tools`
    format: str | None         # how it writes calls (a key of FORMATS); None: not known


# Markers in a chat template (how it renders an assistant's calls) or in the tokenizer's tokens.
_TOOL_MARKERS = (("<｜tool▁call▁begin｜>", "deepseek"), ("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                     ("<|python_tag|>", "llama3_json"))
_TOOLS_VARIABLE = re.compile(r"\btools\b")


def detect_format(chat_template: str | None, tokens: Iterable[str] = ()) -> ToolSupport:
    """The tool-call format from the chat template first (it shows how past calls are written), then
    from the tokenizer's tokens; a Llama 3 template without the tag is recognised by its ipython role."""
    template = chat_template or ""
    found = next((name for marker, name in _TOOL_MARKERS if marker in template), None)
    if found is None:
        vocabulary = set(tokens)
        found = next((name for marker, name in _TOOL_MARKERS if marker in vocabulary), None)
    if found is None and "ipython" in template and '"parameters"' in template:
        found = "llama3_json"
    return ToolSupport(renders_tools=bool(_TOOLS_VARIABLE.search(template)), format=found)


def checkpoint_tool_support(folder: str | Path) -> ToolSupport | None:
    """detect_format over a model folder's files: the chat template from chat_template.jinja,
    chat_template.json (processors) or tokenizer_config.json; tokens (only when the template names
    no format) from the added tokens of tokenizer_config.json, then tokenizer.json. None when the
    folder holds no chat template (not downloaded yet). Cached per folder until its files change."""
    folder = Path(folder)
    stamp = tuple(_mtime(folder / name) for name in _TEMPLATE_FILES)
    return _cached_support(str(folder), stamp) if any(stamp) else None


_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=64)
def _cached_support(folder_name: str, stamp: tuple) -> ToolSupport | None:
    folder = Path(folder_name)
    templates: list[str] = []
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        templates.append(jinja.read_text(encoding="utf-8", errors="replace"))
    config = {}
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _json(folder / name)
        config = data if name == "tokenizer_config.json" else config
        template = data.get("chat_template")
        if isinstance(template, str):
            templates.append(template)
        elif isinstance(template, list):  # [{"name": "default" | "tool_use", "template": ...}]
            templates += [t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    if not templates:
        return None
    template = "\n".join(templates)
    support = detect_format(template)
    if support.format is not None:
        return support
    decoder = config.get("added_tokens_decoder")
    tokens = [t.get("content", "") for t in decoder.values() if isinstance(t, dict)] if isinstance(decoder, dict) else []
    if not tokens:
        added = _json(folder / "tokenizer.json").get("added_tokens")
        tokens = [t.get("content", "") for t in added if isinstance(t, dict)] if isinstance(added, list) else []
    return detect_format(template, tokens)


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


def _mtime_of(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0
