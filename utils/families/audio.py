"""Qwen2-Audio: a question about one or more clips of 16 kHz audio."""
from __future__ import annotations

from utils.families.base import Family, GenerationParams, GenerationRequest, GenerationResult, chat_messages, \
    from_pretrained_kwargs


class AudioFamily(Family):
    name = "audio"
    accepts = frozenset({"audio"})
    quant_skip_modules = ["audio_tower", "multi_modal_projector", "lm_head"]

    @classmethod
    def load(cls, spec, device):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        processor = AutoProcessor.from_pretrained(spec.path)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(
            spec.path, **from_pretrained_kwargs(spec, device, cls.quant_skip_modules))
        model.eval()
        return cls(spec, device, model, processor)

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_media(request)
        # The template renders each audio item as "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>".
        items = [{"type": "audio", "audio_url": f"audio-{i}"} for i in range(len(request.audios))]
        text = self.processor.apply_chat_template(chat_messages(request, items), tokenize=False,
                                                  add_generation_prompt=True)
        kwargs = {"text": [text], "return_tensors": "pt", "padding": True}
        if request.audios:
            kwargs.update(audio=list(request.audios), sampling_rate=self.sampling_rate)
        inputs = self.processor(**kwargs)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def generate(self, prepared: dict, params: GenerationParams) -> GenerationResult:
        return self._decode_new_tokens(prepared, self._run_generate(prepared, params), params)
