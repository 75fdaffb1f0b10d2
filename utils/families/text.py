"""Text LLMs (Qwen3 architecture: DeepSeek-R1-0528-Qwen3-8B) with reasoning split from the answer."""
from __future__ import annotations

from typing import Any

from utils.errors import InvalidInput
from utils.families.base import Family, GenerationRequest, GenerationResult, tools_kwargs

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TextFamily(Family):
    name = "text"
    accepts = frozenset()

    model_class = "AutoModelForCausalLM"
    processor_class = "AutoTokenizer"
    continuous_batching = True  # requests join the running batch between decode steps (engine/continuous.py)

    def prepare(self, request: GenerationRequest) -> dict:
        self.check_request(request)
        if request.raw and request.prompt_ids is not None:  # a completion of token ids: taken as they are
            import torch  # deferred: torch
            vocab = len(self.processor)
            bad = next((i for i, token in enumerate(request.prompt_ids) if not 0 <= token < vocab), None)
            if bad is not None:
                raise InvalidInput(f"token id {request.prompt_ids[bad]} is not in the vocabulary of '{self.spec.key}'",
                                   field=f"prompt[{bad}]", error="value out of range")
            ids = torch.tensor([request.prompt_ids], dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        elif request.raw:  # a legacy completion: the text continues as it is
            inputs = self.processor(request.prompt, return_tensors="pt")
        else:
            with self.client_data(request, "chat template"):
                inputs = self.processor.apply_chat_template(text_messages(request), add_generation_prompt=True,
                                                            return_tensors="pt", return_dict=True,
                                                            **tools_kwargs(request))
        return {k: v.to(self.model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def result_from_tokens(self, tokens: list[int], prompt_tokens: int, finish_reason: str) -> GenerationResult:
        reasoning, answer = split_reasoning(self.processor, tokens)
        return GenerationResult(text=answer, reasoning=reasoning, prompt_tokens=prompt_tokens,
                                completion_tokens=len(tokens), finish_reason=finish_reason)


def text_messages(request: GenerationRequest) -> list[dict]:
    """Chat messages with plain-string contents, as text-only chat templates expect them (tool calls
    and tool_call_id kept as they are)."""
    if request.messages is not None:
        return [{**m, "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
                for m in request.messages]
    messages = [{"role": "system", "content": request.system}] if request.system else []
    return messages + [{"role": "user", "content": request.prompt}]


def split_reasoning(tokenizer: Any, token_ids: list[int]) -> tuple[str | None, str]:
    """Splits `<think>…</think>answer` into (reasoning, answer) on token ids, not on decoded text.

    R1-style templates often open the think block in the prompt, so the output may hold only the
    closing tag. An unclosed block (generation cut short) is all reasoning and no answer yet.
    """
    close_id = _single_token_id(tokenizer, THINK_CLOSE)
    open_id = _single_token_id(tokenizer, THINK_OPEN)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    if close_id is not None and open_id is not None:
        if close_id in token_ids:
            cut = token_ids.index(close_id)
            thought = [t for t in token_ids[:cut] if t != open_id]
            return decode(thought), decode(token_ids[cut + 1:])
        if open_id in token_ids:
            return decode(token_ids[token_ids.index(open_id) + 1:]), decode(token_ids[:token_ids.index(open_id)])
        return None, decode(token_ids)
    return split_reasoning_text(tokenizer.decode(token_ids, skip_special_tokens=True))


def split_reasoning_text(text: str) -> tuple[str | None, str]:
    if THINK_CLOSE in text:
        thought, answer = text.split(THINK_CLOSE, 1)
        return thought.replace(THINK_OPEN, "").strip(), answer.strip()
    if THINK_OPEN in text:
        before, thought = text.split(THINK_OPEN, 1)
        return thought.strip(), before.strip()
    return None, text.strip()


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None
