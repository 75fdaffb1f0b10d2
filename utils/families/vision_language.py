"""Qwen2.5-VL: one or several images, a video, or images and video together."""
from __future__ import annotations

from utils.families.base import Family, GenerationRequest
from utils.families.qwen_vision import fit_media
from utils.media.options import VIDEO_OPTIONS


class VisionLanguageFamily(Family):
    name = "vision_language"
    accepts = frozenset({"image", "video"})
    model_class = "AutoModelForImageTextToText"
    # bitsandbytes 4-bit on CPU rejects the vision tower's odd layer sizes; it stays in dtype.
    quant_skip_modules = ["model.visual", "lm_head"]
    max_aspect_ratio = 200  # Qwen2-VL's smart_resize raises beyond 200:1 (images and video frames)
    media_options = frozenset(VIDEO_OPTIONS)  # per-item fps / nframes / pixel bounds (families/qwen_vision.py)

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        request = fit_media(self.processor, request)
        items = [{"type": "image"} for _ in request.images] + [{"type": "video"} for _ in request.videos]
        return self.chat_inputs(request, items)
