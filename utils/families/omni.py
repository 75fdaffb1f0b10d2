"""Qwen2.5-Omni: text, images, video and audio together in one request; text out.

The checkpoint holds thinker, talker and token2wav. Loading with enable_audio_output=False builds
no talker, and the thinker alone generates the text, so no speech weights take memory.
"""
from __future__ import annotations

from utils.families.base import Family, GenerationParams, GenerationRequest, GenerationResult, chat_messages, \
    from_pretrained_kwargs


class OmniFamily(Family):
    name = "omni"
    accepts = frozenset({"image", "video", "audio"})
    quant_skip_modules = ["thinker.visual", "thinker.audio_tower", "thinker.lm_head", "lm_head"]

    @classmethod
    def load(cls, spec, device):
        from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

        processor = Qwen2_5OmniProcessor.from_pretrained(spec.path)
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
            spec.path, enable_audio_output=False, **from_pretrained_kwargs(spec, device, cls.quant_skip_modules))
        model.eval()
        return cls(spec, device, model, processor)

    def _generator(self):
        return self.model.thinker

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_media(request)
        items = ([{"type": "image"} for _ in request.images] + [{"type": "video"} for _ in request.videos]
                 + [{"type": "audio"} for _ in request.audios])
        text = self.processor.apply_chat_template(chat_messages(request, items), tokenize=False,
                                                  add_generation_prompt=True)
        kwargs = {"text": [text], "return_tensors": "pt", "padding": True}
        if request.images:
            kwargs["images"] = list(request.images)
        if request.videos:
            kwargs["videos"] = [clip.frames for clip in request.videos]
            kwargs["video_metadata"] = [clip.metadata() for clip in request.videos]
            kwargs["do_sample_frames"] = False
        if request.audios:
            kwargs["audio"] = list(request.audios)
            kwargs["sampling_rate"] = int(self.processor.feature_extractor.sampling_rate)
        inputs = self.processor(**kwargs)
        return {k: (v.to(self.model.device) if hasattr(v, "to") else v) for k, v in inputs.items()}

    def generate(self, prepared: dict, params: GenerationParams) -> GenerationResult:
        return self._decode_new_tokens(prepared, self._run_generate(prepared, params), params)
