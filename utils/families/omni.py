"""Qwen2.5-Omni: text, images, video and audio together in one request; text out.

The checkpoint holds thinker, talker and token2wav. Loading with enable_audio_output=False builds
no talker, and the thinker alone generates the text, so no speech weights take memory.
"""
from __future__ import annotations

from utils.families.base import Family, GenerationRequest
from utils.families.qwen_vision import fit_media
from utils.media.options import VIDEO_OPTIONS


class OmniFamily(Family):
    name = "omni"
    accepts = frozenset({"image", "video", "audio"})
    model_class = "Qwen2_5OmniForConditionalGeneration"
    processor_class = "Qwen2_5OmniProcessor"
    model_kwargs = {"enable_audio_output": False}
    quant_skip_modules = ["thinker.visual", "thinker.audio_tower", "thinker.lm_head", "lm_head"]
    max_aspect_ratio = 200  # Qwen2-VL's smart_resize raises beyond 200:1 (images and video frames)
    media_options = frozenset(VIDEO_OPTIONS)  # per-item fps / nframes / pixel bounds (families/qwen_vision.py)
    # A clip becomes ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1 audio tokens (Whisper features, hop 160
    # at 16 kHz): below 3 mel frames (321 samples, ~20 ms) that is none and the model never hears it.
    min_audio_seconds = (2 * 160 + 1) / 16000

    def _generator(self):
        return self.model.thinker

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        request = fit_media(self.processor, request)
        items = ([{"type": "image"} for _ in request.images] + [{"type": "video"} for _ in request.videos]
                 + [{"type": "audio"} for _ in request.audios])
        return self.chat_inputs(request, items)
