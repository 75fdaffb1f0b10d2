"""The value parsers settings are loaded with: each takes a raw YAML or environment value and the
place it came from (`where`), and returns the typed value or raises ConfigError naming that place."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from utils.config.schema import GIB, IMAGE_FAMILIES, OPENVINO_FAMILIES, ModelSpec
from utils.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30,
               "tb": 10**12, "tib": 2**40}


def _fail(where: str, msg: str) -> None:
    raise ConfigError(f"{where}: {msg}")


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        _fail(where, f"expected an integer, got {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and value != number:
            raise ValueError
        if isinstance(value, str) and value.strip() != str(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: .inf
        _fail(where, f"expected an integer, got {value!r}"[:200])
    if minimum is not None and number < minimum:
        _fail(where, f"must be >= {minimum}, got {number}")
    return number


def _float(value: Any, where: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool):
        _fail(where, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        _fail(where, f"expected a number, got {value!r}"[:200])
    if number != number or number in (float("inf"), float("-inf")) or abs(number) > 1e12:
        _fail(where, f"must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        _fail(where, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        _fail(where, f"must be <= {maximum}, got {number}")
    return number


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    _fail(where, f"expected true or false, got {value!r}")
    return False


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text not in choices:
        _fail(where, f"must be one of {', '.join(choices)}; got {value!r}")
    return text


def _gib(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "auto")):
        return None
    return int(_float(value, where, minimum=0) * GIB)


def _keep_alive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    seconds = _float(value, where)
    if seconds < 0 and seconds != -1:
        _fail(where, f"must be -1 (never unload), 0 (after each request) or a positive number of seconds; got {value!r}")
    return seconds


def _mapping(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _only_known(section: Mapping, where: str, known: set[str]) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")


def _resolve(path_value: Any, base: Path, where: str) -> Path:
    if not isinstance(path_value, (str, os.PathLike)) or not str(path_value).strip():
        _fail(where, f"expected a path, got {path_value!r}")
    try:
        path = Path(os.path.expanduser(str(path_value)))
        return (path if path.is_absolute() else base / path).resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        _fail(where, f"not a usable path ({exc}): {str(path_value)[:100]!r}")


# Revisions that move: remote code from one of these could change under the server between two loads.
_MOVING_REVISIONS = ("main", "master", "head")


def _check_remote_code(spec: ModelSpec, where: str, *, pinned: bool) -> None:
    """trust_remote_code runs Python from the checkpoint: only code pinned to a commit or a tag (a name
    that moves, or none, would run whatever the repo holds at the next download)."""
    if not spec.trust_remote_code:
        return
    revision = spec.revision.strip()
    if not pinned or not revision or revision.lower() in _MOVING_REVISIONS or revision.startswith("refs/heads/"):
        given = repr(revision) if pinned else "unset (the default, 'main', moves)"
        _fail(f"{where}.trust_remote_code", f"'{spec.key}' runs the checkpoint's own code: pin it with 'revision' "
                                            f"(a commit sha or a tag; the revision is {given})")


def _check_compile(spec: ModelSpec, where: str, raw: Mapping) -> None:
    """engine.compile without static_cache compiles the continuous engine's decode step: a model that
    sets it itself must be one that engine serves (a server-wide compile leaves the others eager)."""
    engine = spec.engine
    if not engine.compile or engine.static_cache or not (raw.get("engine") or {}).get("compile"):
        return
    if spec.family != "text" or spec.trust_remote_code:
        what = "a remote-code model" if spec.trust_remote_code else f"the {spec.family} family"
        _fail(f"{where}.engine.compile", f"without static_cache, compile is the continuous engine's (text models, "
                                         f"not remote code), and {what} does not run it; set static_cache: true "
                                         f"(generate compiles on CUDA) or leave compile off")


def _check_openvino_model(spec: ModelSpec, where: str, raw: Mapping) -> None:
    """What an openvino model can be configured with: its weights are compressed at export
    (weight_format), it runs in openvino-genai's own continuous batching, on one device."""
    if spec.runtime != "openvino":
        if "weight_format" in raw:
            _fail(f"{where}.weight_format", "weight_format is for runtime: openvino (pytorch models use "
                                            "quantization)")
        return
    if spec.family not in OPENVINO_FAMILIES:
        _fail(f"{where}.runtime", f"runtime openvino serves the {', '.join(OPENVINO_FAMILIES)} family; "
                                  f"'{spec.family}' runs on pytorch")
    if spec.quantization != "none":
        _fail(f"{where}.quantization", "an openvino model compresses its weights at export: set weight_format "
                                       "(int4, int8, fp16, fp32) and leave quantization at none")
    if spec.max_memory:
        _fail(f"{where}.max_memory", "an openvino model runs on one device; max_memory splits pytorch models")
    if spec.trust_remote_code:
        _fail(f"{where}.trust_remote_code", "the openvino exporter takes architectures transformers ships only")
    engine = spec.engine
    if engine.batching == "dynamic" or engine.static_cache or engine.compile or engine.attn_implementation != "auto":
        _fail(f"{where}.engine", "an openvino model batches continuously in openvino-genai: batching dynamic, "
                                 "static_cache, compile and attn_implementation are pytorch settings")


def _check_image_model(spec: ModelSpec, where: str) -> None:
    """What an image family (diffusers pipeline) can and cannot be configured with."""
    if spec.family not in IMAGE_FAMILIES:
        if spec.offload != "none":
            _fail(f"{where}.offload", f"offload is for the image families ({', '.join(IMAGE_FAMILIES)}); "
                                      f"'{spec.family}' models split with max_memory instead")
        return
    if spec.quantization != "none":
        _fail(f"{where}.quantization", f"the image families load in dtype only (none); got {spec.quantization}")
    if spec.max_memory:
        _fail(f"{where}.max_memory", "the image families do not split by max_memory; use offload: model|sequential")
    if spec.engine.batching == "continuous":
        _fail(f"{where}.engine.batching", "image models batch dynamically (auto or dynamic)")
    generation, limits = spec.generation, spec.limits
    if generation.num_inference_steps > limits.max_steps:
        _fail(f"{where}.generation.num_inference_steps",
              f"default {generation.num_inference_steps} exceeds limits.max_steps {limits.max_steps}")
    if generation.width and generation.height and generation.width * generation.height > limits.max_image_pixels:
        _fail(f"{where}.generation.width", f"default {generation.width}x{generation.height} exceeds "
                                           f"limits.max_image_pixels {limits.max_image_pixels}")
    if limits.max_images_out < 1 or limits.max_steps < 1:
        _fail(f"{where}.limits", "max_steps and max_images_out must be at least 1 for an image model")
    if spec.family == "image_edit" and limits.max_images is not None and limits.max_images < 1:
        _fail(f"{where}.limits.max_images", "an image_edit model takes one input image: set max_images: 1")


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _size(value: Any, where: str) -> int:
    """Bytes from a number of bytes or a string such as "8GiB" / "500MB" (seed 001's form)."""
    if isinstance(value, bool):
        _fail(where, f"expected a size such as 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if not 0 < value < 2**63:  # .inf and nan included
            _fail(where, f"must be a positive size, got {value!r}"[:200])
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        _fail(where, f"expected a size such as 8GiB or 500MB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "null")) \
        else value
