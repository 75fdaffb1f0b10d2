"""Qwen2-Audio: a question about one or more clips of 16 kHz audio."""
from __future__ import annotations

from utils.families.base import Family, GenerationRequest


class AudioFamily(Family):
    name = "audio"
    accepts = frozenset({"audio"})
    model_class = "Qwen2AudioForConditionalGeneration"
    quant_skip_modules = ["audio_tower", "multi_modal_projector", "lm_head"]
    # A clip becomes ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1 audio tokens (Whisper features, hop 160
    # at 16 kHz). With fewer than 2 (below 7 mel frames: 961 samples, ~60 ms), Qwen2-Audio's forward
    # takes the prompt for an unexpanded legacy one and fails ("'NoneType' object is not subscriptable").
    min_audio_seconds = (6 * 160 + 1) / 16000

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        # The template renders each audio item as "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>".
        items = [{"type": "audio", "audio_url": f"audio-{i}"} for i in range(len(request.audios))]
        return self.chat_inputs(request, items)
