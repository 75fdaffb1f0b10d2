"""Qwen2-Audio: a question about one or more clips of 16 kHz audio."""
from __future__ import annotations

from utils.families.base import Family, GenerationRequest


class AudioFamily(Family):
    name = "audio"
    accepts = frozenset({"audio"})
    model_class = "Qwen2AudioForConditionalGeneration"
    quant_skip_modules = ["audio_tower", "multi_modal_projector", "lm_head"]

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_media(request)
        # The template renders each audio item as "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>".
        items = [{"type": "audio", "audio_url": f"audio-{i}"} for i in range(len(request.audios))]
        return self.chat_inputs(request, items)
