"""Per-item pixel bounds for the Qwen2-VL style processors (Qwen2.5-VL, Qwen2.5-Omni), as qwen-vl-utils
applies them: each image or video whose request part gives max_pixels / min_pixels is resized here with
the processor's own smart_resize (sides multiples of patch x merge) within those bounds clamped into the
processor's; the processor's resize then leaves it as it is. Items without options are untouched."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from utils.media.options import pixel_bounds


def fit_media(processor: Any, request: Any) -> Any:
    """The request with its images and video frames resized to their parts' pixel bounds."""
    options = request.media_options
    if not any(o.get("max_pixels") or o.get("min_pixels") for items in options.values() for o in items):
        return request
    image_bounds = _bounds(processor.image_processor, options.get("image", []), len(request.images))
    video_bounds = _bounds(processor.video_processor, options.get("video", []), len(request.videos))
    images = [_fit_image(image, bounds) if bounds else image for image, bounds in zip(request.images, image_bounds)]
    videos = [replace(clip, frames=_fit_frames(clip.frames, bounds)) if bounds else clip
              for clip, bounds in zip(request.videos, video_bounds)]
    return replace(request, images=images, videos=videos)


def _bounds(sub_processor: Any, items: list[dict], count: int) -> list[tuple[int, int, int] | None]:
    """(factor, min, max) for each of `count` items, or None where the item has no pixel options."""
    size = sub_processor.size
    factor = int(sub_processor.patch_size * sub_processor.merge_size)
    out: list[tuple[int, int, int] | None] = []
    for i in range(count):
        bounds = pixel_bounds(items[i] if i < len(items) else None, int(size["shortest_edge"]),
                              int(size["longest_edge"]))
        out.append((factor, *bounds) if bounds else None)
    return out


def _target(width: int, height: int, bounds: tuple[int, int, int]) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # deferred: transformers
    factor, low, high = bounds
    new_height, new_width = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    return new_width, new_height


def _fit_image(image: Image.Image, bounds: tuple[int, int, int]) -> Image.Image:
    size = _target(*image.size, bounds)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _fit_frames(frames: np.ndarray, bounds: tuple[int, int, int]) -> np.ndarray:
    height, width = frames.shape[1:3]
    size = _target(width, height, bounds)
    if size == (width, height):
        return frames
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC)) for frame in frames])
