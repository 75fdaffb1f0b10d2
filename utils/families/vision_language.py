"""Qwen2.5-VL: one or several images, a video, or images and video together."""
from __future__ import annotations

from utils.families.base import Family, GenerationParams, GenerationRequest, GenerationResult, chat_messages, \
    from_pretrained_kwargs


class VisionLanguageFamily(Family):
    name = "vision_language"
    accepts = frozenset({"image", "video"})
    # bitsandbytes 4-bit on CPU rejects the vision tower's odd layer sizes; it stays in dtype.
    quant_skip_modules = ["model.visual", "lm_head"]

    @classmethod
    def load(cls, spec, device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(spec.path)
        model = AutoModelForImageTextToText.from_pretrained(
            spec.path, **from_pretrained_kwargs(spec, device, cls.quant_skip_modules))
        model.eval()
        return cls(spec, device, model, processor)

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_media(request)
        items = [{"type": "image"} for _ in request.images] + [{"type": "video"} for _ in request.videos]
        text = self.processor.apply_chat_template(chat_messages(request, items), tokenize=False,
                                                  add_generation_prompt=True)
        kwargs = {"text": [text], "return_tensors": "pt", "padding": True}
        if request.images:
            kwargs["images"] = list(request.images)
        if request.videos:
            kwargs["videos"] = [clip.frames for clip in request.videos]
            kwargs["video_metadata"] = [clip.metadata() for clip in request.videos]
            kwargs["do_sample_frames"] = False  # media.py already sampled them evenly
        inputs = self.processor(**kwargs)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def generate(self, prepared: dict, params: GenerationParams) -> GenerationResult:
        return self._decode_new_tokens(prepared, self._run_generate(prepared, params), params)
