"""Per-item media options (seed 004 / qwen-vl-utils form): how many frames to take from a video and how
many pixels an image or a video frame may have once the processor sees it.

    {"type": "video_url", "video_url": {"url": ...}, "fps": 1, "max_pixels": "360*420"}
    {"type": "image_url", "image_url": {"url": ...}, "min_pixels": 3136, "max_pixels": 200704}

- ``fps``: frames per second sampled from the clip's timeline; ``nframes``: the number of frames (not
  both). Either way at most the server's ``max_video_frames`` and the clip's own frame count.
- ``max_pixels`` / ``min_pixels``: bounds on width x height of each image or frame, an integer or a
  product of integers written as a string ("360*420", parsed here, never evaluated); clamped into the
  processor's own bounds by the family (utils/families/qwen_vision.py), which lie far under the server's
  decoding cap (max_image_pixels).

No torch, no Flask: the route validates with these before anything is decoded or leased.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from utils.errors import InvalidInput

VIDEO_OPTIONS = ("fps", "nframes", "max_pixels", "min_pixels")
IMAGE_OPTIONS = ("max_pixels", "min_pixels")
MAX_FPS = 240.0                       # above this no clip has more frames to give (media.MAX_SOURCE_FPS)
_PRODUCT = re.compile(r"\s*\d{1,9}(?:\s*\*\s*\d{1,9}){0,3}\s*")   # "360*420", "28 * 28 * 1280"
_MAX_EXPRESSION = 64                  # characters of a pixel expression


def parse_pixels(value: Any, field: str) -> int:
    """A pixel count: an integer, or a string holding an integer or a product of integers ("360*420")."""
    if isinstance(value, bool):
        raise InvalidInput(f"'{field}' must be a number of pixels; got {value!r}", field=field)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        if len(value) > _MAX_EXPRESSION or not _PRODUCT.fullmatch(value):
            raise InvalidInput(f"'{field}' must be a number of pixels or a product such as \"360*420\"; "
                               f"got {value[:_MAX_EXPRESSION]!r}", field=field)
        value = math.prod(int(factor) for factor in value.split("*"))
    if not isinstance(value, int):
        raise InvalidInput(f"'{field}' must be a whole number of pixels; got {value!r}", field=field)
    if value < 1:
        raise InvalidInput(f"'{field}' must be at least 1 pixel; got {value}", field=field,
                           error="value out of range")
    return value


def parse_media_options(part: Mapping, kind: str, field: str) -> dict:
    """The options of one content part (read beside the url object and inside it), validated:
    {"fps": float, "nframes": int, "max_pixels": int, "min_pixels": int}, only those given."""
    names = VIDEO_OPTIONS if kind == "video" else IMAGE_OPTIONS
    url_object = part.get(f"{kind}_url")
    inner = url_object if isinstance(url_object, Mapping) else {}
    options: dict[str, Any] = {}
    for name in VIDEO_OPTIONS:
        given = [where for where in (part, inner) if where.get(name) is not None]
        if not given:
            continue
        where = f"{field}.{name}"
        if name not in names:
            raise InvalidInput(f"'{name}' applies to videos only (image parts take {', '.join(IMAGE_OPTIONS)})",
                               field=where, error="unsupported parameter")
        if len(given) > 1 and part[name] != inner[name]:
            raise InvalidInput(f"'{name}' is given twice with different values (beside and inside "
                               f"'{kind}_url')", field=where)
        options[name] = _value(name, given[0][name], where)
    if "fps" in options and "nframes" in options:
        raise InvalidInput("give 'fps' or 'nframes', not both", field=f"{field}.nframes")
    low, high = options.get("min_pixels"), options.get("max_pixels")
    if low is not None and high is not None and low > high:
        raise InvalidInput(f"'min_pixels' ({low}) is larger than 'max_pixels' ({high})", field=f"{field}.min_pixels",
                           error="value out of range")
    return options


def _value(name: str, value: Any, field: str) -> Any:
    if name in ("max_pixels", "min_pixels"):
        return parse_pixels(value, field)
    if name == "nframes":
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
            raise InvalidInput(f"'nframes' must be a whole number of frames; got {value!r}", field=field)
        if value < 1:
            raise InvalidInput(f"'nframes' must be at least 1; got {value}", field=field, error="value out of range")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"'fps' must be a number of frames per second; got {value!r}", field=field)
    if not 0 < value <= MAX_FPS:
        raise InvalidInput(f"'fps' must be above 0 and at most {MAX_FPS:g}; got {value}", field=field,
                           error="value out of range")
    return float(value)


def frame_count(options: Mapping | None, total: int, duration: float, cap: int) -> int:
    """Frames to keep from a clip of `total` frames lasting `duration` seconds: `nframes`, or `fps` times
    the duration (rounded up), else the server's cap; never more than `cap` or `total`, at least 1."""
    options = options or {}
    wanted = cap
    if options.get("nframes") is not None:
        wanted = options["nframes"]
    elif options.get("fps") is not None and duration > 0:
        wanted = math.ceil(duration * options["fps"] - 1e-9)
    return max(1, min(wanted, cap, total))


def pixel_bounds(options: Mapping | None, low: int, high: int) -> tuple[int, int] | None:
    """The (min, max) pixels an item is resized within: the request's bounds clamped into the
    processor's [low, high]; None when the request gives none (the processor's own resize applies)."""
    options = options or {}
    if options.get("max_pixels") is None and options.get("min_pixels") is None:
        return None
    top = min(max(options.get("max_pixels", high), low), high)
    bottom = min(max(options.get("min_pixels", low), low), top)
    return bottom, top
