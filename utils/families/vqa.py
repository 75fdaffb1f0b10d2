"""BLIP visual question answering: one image and a question, a short answer."""
from __future__ import annotations

from utils.errors import InvalidInput
from utils.families.base import Family, GenerationParams, GenerationRequest


class VqaFamily(Family):
    name = "vqa"
    accepts = frozenset({"image"})
    min_images = 1

    model_class = "BlipForQuestionAnswering"
    processor_class = "BlipProcessor"
    uses_chat_template = False  # BLIP takes the question as it is
    padding_side = "right"  # BLIP's question encoder has absolute positions: left padding would shift them

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        if len(request.images) != 1:
            raise InvalidInput(f"'{self.spec.key}' answers a question about exactly one image; "
                               f"got {len(request.images)}", field="image", error="missing image")
        with self.client_data(request, "processor"):
            inputs = self.processor(images=request.images[0], text=question(request), return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _generate_kwargs(self, params: GenerationParams) -> dict:
        kwargs = super()._generate_kwargs(params)
        kwargs.pop("pad_token_id", None)  # BLIP's generate passes its own
        return kwargs

    def check_context(self, prompt_tokens, params, *, counts_new_tokens=False):
        # The question goes to BLIP's text encoder; the answer comes from its own decoder.
        super().check_context(prompt_tokens, params, counts_new_tokens=False)


def question(request: GenerationRequest) -> str:
    """BLIP answers one question: in a conversation, the last user turn's text (history is dropped)."""
    if request.messages is None:
        return request.prompt
    last = [m for m in request.messages if m["role"] == "user"][-1]
    return " ".join(p["text"] for p in last["content"] if p["type"] == "text").strip() or request.prompt
