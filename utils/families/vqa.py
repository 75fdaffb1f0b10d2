"""Visual question answering without a chat template: an image (or several) and a question, a short answer.

BLIP (BlipForQuestionAnswering: its own question encoder and answer decoder, one image) and PaliGemma
(a decoder-only model whose processor puts the image tokens and bos before the question itself). The
checkpoint's architecture (utils/hub/model_folder.py) picks the class and the padding side.
"""
from __future__ import annotations

from typing import Any

from utils.errors import InvalidInput
from utils.families.base import Family, GenerationParams, GenerationRequest, from_pretrained_kwargs
from utils.hub.model_folder import read_capabilities

# architecture -> (transformers class, padding side). BLIP's question encoder has absolute positions: left
# padding would shift them; decoder-only PaliGemma pads on the left like every generating decoder.
_CLASSES = {"blip": ("BlipForQuestionAnswering", "right")}
_DEFAULT = ("AutoModelForImageTextToText", "left")


class VqaFamily(Family):
    name = "vqa"
    accepts = frozenset({"image"})
    min_images = 1

    model_class = "BlipForQuestionAnswering"
    processor_class = "AutoProcessor"
    uses_chat_template = False  # the question goes in as it is
    padding_side = "right"

    def __init__(self, spec, device, model, processor) -> None:
        super().__init__(spec, device, model, processor)
        self.architecture = _architecture(spec)
        self.padding_side = _CLASSES.get(self.architecture, _DEFAULT)[1]

    @classmethod
    def weights(cls, spec, device: str) -> tuple[Any, dict]:
        import transformers  # deferred: transformers
        name = _CLASSES.get(_architecture(spec), _DEFAULT)[0]
        return getattr(transformers, name), {**cls.model_kwargs, **from_pretrained_kwargs(spec, device,
                                                                                         cls.quant_skip_modules)}

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        if self.architecture == "blip" and len(request.images) != 1:
            raise InvalidInput(f"'{self.spec.key}' answers a question about exactly one image; "
                               f"got {len(request.images)}", field="image", error="missing image")
        text = question(request)
        if self.architecture != "blip":  # PaliGemma: one image token per image before the question, as its
            text = self.processor.image_token * len(request.images) + text  # processor would add them (warning)
        images = request.images[0] if len(request.images) == 1 else [list(request.images)]
        with self.client_data(request, "processor"):
            inputs = self.processor(images=images, text=text, return_tensors="pt")
        # PaliGemma's processor also returns training `labels`: generation takes none
        return {k: v.to(self.model.device) for k, v in inputs.items() if k != "labels"}

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        kwargs = super()._generate_kwargs(params)
        if self.architecture == "blip":
            kwargs.pop("pad_token_id", None)  # BLIP's generate passes its own
        return kwargs

    def check_context(self, prompt_tokens, params, *, counts_new_tokens=True):
        # BLIP: the question goes to its text encoder; the answer comes from its own decoder.
        super().check_context(prompt_tokens, params, counts_new_tokens=self.architecture != "blip")


def _architecture(spec) -> str | None:
    found = read_capabilities(spec.path)
    return found.architecture if found else "blip"


def question(request: GenerationRequest) -> str:
    """The model answers one question: in a conversation, the last user turn's text (history is dropped)."""
    if request.messages is None:
        return request.prompt
    last = [m for m in request.messages if m["role"] == "user"][-1]
    return " ".join(p["text"] for p in last["content"] if p["type"] == "text").strip() or request.prompt
