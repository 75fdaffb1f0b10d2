"""The architecture matrix: tiny random-weight checkpoints of more architectures, for `main.py --demo all`
and tests/test_matrix.py.

Each builder writes a folder that loads through the same transformers classes and processor as the
real checkpoints (real configs, real processors, tokenizers built offline like utils/hub/demo_models.py),
with a chat template in the real model's shape (turn markers, where media go, whether a system role
exists). Families are not written here: the server reads them, and what each model takes, from the
folder (utils/hub/model_folder.py read_capabilities).

    MATRIX: key -> MatrixModel(builder, architecture, the real repo it stands for, family)

Built and cached like the default demo set (utils/hub/demo_models.build_demo_models takes these keys too);
docs/models.md is the table of them (tests/matrix_table.py writes it, tests/test_matrix.py checks it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from utils.config.schema import DEMO_MATRIX
from utils.hub.demo_parts import (_MROPE, _QWEN_SPECIAL, _fast_tokenizer, _ids, _keep_only_word_logits,
                                  _vision_processors, _vocab_size, _write_generation_config)

# Text sizes (bitsandbytes-friendly like the other demos): 2 layers, width 64, 4 heads of 16.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)


# --------------------------------------------------------------------------------------------------
# Chat templates: one generator for the common shape "bos, then per turn <open role> content <close>",
# media parts rendered as the model's placeholder in place.
# --------------------------------------------------------------------------------------------------

def _chat_template(*, turn_open: dict[str, str], turn_close: str, generation_prompt: str, bos: str = "",
                   image: str | None = None, video: str | None = None, system: str = "turn",
                   tools: str = "") -> str:
    """`turn_open`: role -> text before a turn's content ("{role}" is replaced by the role);
    `system`: "turn" (a turn of its own), "refuse" (raise_exception, as Gemma's templates do) or
    "prepend" (into the first user turn); `tools`: jinja rendering `tools` before the turns."""
    def opener(role: str) -> str:
        return turn_open.get(role, turn_open.get("*", "")).replace("{role}", role)

    part = "{%- for part in message['content'] -%}"
    if image:
        part += f"{{%- if part['type'] == 'image' -%}}{image}"
        part += (f"{{%- elif part['type'] == 'video' -%}}{video}" if video else "")
        part += "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    else:
        part += "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    part += "{%- endfor -%}"
    content = ("{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}" + part
               + "{%- endif -%}")
    head = f"{bos}"
    if system == "refuse":
        head += ("{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
                 "{{ raise_exception('System role not supported') }}{%- endif -%}{%- endfor -%}")
    body = "{%- for message in messages -%}"
    roles = [r for r in turn_open if r != "*"] or ["user", "assistant"]
    for i, role in enumerate(dict.fromkeys(["system", "user", "assistant", *roles])):
        keyword = "if" if i == 0 else "elif"
        if role == "system" and system == "prepend":
            body += f"{{%- {keyword} message['role'] == 'system' -%}}{content}\n\n"
            continue
        body += f"{{%- {keyword} message['role'] == '{role}' -%}}{opener(role)}{content}{turn_close}"
    body += f"{{%- else -%}}{opener('*')}{content}{turn_close}{{%- endif -%}}{{%- endfor -%}}"
    return (head + tools + body
            + f"{{%- if add_generation_prompt -%}}{generation_prompt}{{%- endif -%}}")


# Tools rendered the way Hermes-style templates list them (Qwen2.5, Granite, SmolLM3): functions
# inside <tools></tools>, calls written as <tool_call>{json}</tool_call>.
_HERMES_TOOLS = (
    "{%- if tools -%}{{ '<|system|>You may call functions. <tools>' }}{%- for tool in tools -%}"
    "{{ tool | tojson }}{%- endfor -%}{{ '</tools> Write calls as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>\n' }}{%- endif -%}"
)
_MISTRAL_TOOLS = (
    "{%- if tools -%}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif -%}"
)


def _text_model(out: Path, config_cls: str, model_cls: str, *, special: list[str], bos: str | None, eos: str,
                pad: str, template: str, added: list[str] = (), **config) -> None:
    import transformers  # deferred: transformers

    tok = _fast_tokenizer(special=special, added=list(added), bos=bos, eos=eos, pad=pad, chat_template=template)
    ids = dict(eos_token_id=tok.convert_tokens_to_ids(eos), pad_token_id=tok.convert_tokens_to_ids(pad),
               bos_token_id=tok.convert_tokens_to_ids(bos) if bos else None)
    cfg = getattr(transformers, config_cls)(vocab_size=_vocab_size(tok), **{**_SMALL, **config}, **ids)
    model = getattr(transformers, model_cls)(cfg)
    _keep_only_word_logits(model.get_output_embeddings(), tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_generation_config(out, do_sample=False, **ids)


def build_llama(out: Path) -> None:
    """Llama 3.x: header-tagged turns, a system turn, bos <|begin_of_text|>."""
    header = "<|start_header_id|>{role}<|end_header_id|>\n\n"
    template = _chat_template(bos="{{ bos_token }}", turn_open={"*": header}, turn_close="<|eot_id|>",
                              generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n")
    _text_model(out, "LlamaConfig", "LlamaForCausalLM", bos="<|begin_of_text|>", eos="<|eot_id|>",
                pad="<|finetune_right_pad_id|>", template=template,
                special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, head_dim=16)


def build_mistral(out: Path) -> None:
    """Mistral Instruct v0.3: [INST] ... [/INST], the system prompt folded into the first user turn,
    [TOOL_CALLS] tokens."""
    template = _chat_template(bos="{{ bos_token }}", turn_open={"user": "[INST] ", "assistant": ""},
                              turn_close="{{ ' [/INST]' if message['role'] == 'user' else eos_token }}",
                              generation_prompt="", system="prepend", tools=_MISTRAL_TOOLS)
    _text_model(out, "MistralConfig", "MistralForCausalLM", bos="<s>", eos="</s>", pad="</s>", template=template,
                special=["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                         "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, head_dim=16, sliding_window=None)


def build_gemma2(out: Path) -> None:
    """Gemma 2 IT: <start_of_turn>user / model, no system role (its template raises on one)."""
    template = _chat_template(bos="{{ bos_token }}", system="refuse",
                              turn_open={"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"},
                              turn_close="<end_of_turn>\n", generation_prompt="<start_of_turn>model\n")
    _text_model(out, "Gemma2Config", "Gemma2ForCausalLM", bos="<bos>", eos="<end_of_turn>", pad="<pad>",
                template=template, special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                head_dim=16, query_pre_attn_scalar=16, sliding_window=64, tie_word_embeddings=False)


def build_phi3(out: Path) -> None:
    """Phi-3.5-mini-instruct: <|system|> / <|user|> / <|assistant|> turns closed by <|end|>."""
    template = _chat_template(turn_open={"*": "<|{role}|>\n"}, turn_close="<|end|>\n",
                              generation_prompt="<|assistant|>\n")
    _text_model(out, "Phi3Config", "Phi3ForCausalLM", bos="<s>", eos="<|end|>", pad="<|endoftext|>",
                template=template, special=["<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                            "<|assistant|>", "<|end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, original_max_position_embeddings=4096)


def build_granite(out: Path) -> None:
    """Granite 3.x instruct: <|start_of_role|>role<|end_of_role|> ... <|end_of_text|>, hermes-style tools."""
    template = _chat_template(turn_open={"*": "<|start_of_role|>{role}<|end_of_role|>"}, turn_close="<|end_of_text|>\n",
                              generation_prompt="<|start_of_role|>assistant<|end_of_role|>", tools=_HERMES_TOOLS)
    _text_model(out, "GraniteConfig", "GraniteForCausalLM", bos="<|end_of_text|>", eos="<|end_of_text|>",
                pad="<|end_of_text|>", template=template, added=["<tool_call>", "</tool_call>"],
                special=["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, embedding_multiplier=12.0,
                logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.0625)


# --------------------------------------------------------------------------------------------------
# Vision-language: a small vision tower (32x32 pixels, patches of 8: 16 patches) before a 2-layer decoder
# --------------------------------------------------------------------------------------------------

_VISION_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=32, patch_size=8)
_PIXELS = 32


def _vlm_tokenizer(special: list[str], template: str, *, bos: str | None, eos: str, pad: str,
                   extra_special_tokens: dict[str, str] | None = None):
    return _fast_tokenizer(special=special, bos=bos, eos=eos, pad=pad, chat_template=template,
                           extra_special_tokens=extra_special_tokens)


def _text_config(tok, model_type: str, **extra) -> dict:
    pad = tok.pad_token_id
    return dict(_SMALL, model_type=model_type, vocab_size=_vocab_size(tok), head_dim=16, pad_token_id=pad,
                bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else pad,
                eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra)


def _save_vlm(out: Path, model, processor, tok) -> None:
    _keep_only_word_logits(model.get_output_embeddings(), tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_generation_config(out, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id)


_IM_TURN = {"*": "<|im_start|>{role}\n"}  # Qwen / ChatML turns


def build_qwen2_vl(out: Path) -> None:
    """Qwen2-VL-2B-Instruct: ChatML, <|vision_start|><|image_pad|><|vision_end|>, images and video."""
    from transformers import (  # deferred: transformers
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
        Qwen2VLVideoProcessor)

    template = _chat_template(turn_open=_IM_TURN, turn_close="<|im_end|>\n",
                              generation_prompt="<|im_start|>assistant\n",
                              image="<|vision_start|><|image_pad|><|vision_end|>",
                              video="<|vision_start|><|video_pad|><|vision_end|>")
    tok = _vlm_tokenizer(_QWEN_SPECIAL, template, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    image_id, video_id, vs_id, ve_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                            "<|vision_end|>")
    config = Qwen2VLConfig(
        text_config=_text_config(tok, "qwen2_vl_text", rope_parameters=dict(_MROPE)),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
        tie_word_embeddings=False)
    image_proc, video_proc = _vision_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                 chat_template=template)
    _save_vlm(out, Qwen2VLForConditionalGeneration(config), processor, tok)


def build_llava(out: Path) -> None:
    """llava-1.5-7b-hf: CLIP vision tower, Llama decoder, "USER: <image>\n... ASSISTANT:", images only."""
    from transformers import (  # deferred: transformers
        CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    template = _chat_template(bos="{{ bos_token }}", turn_open={"user": "USER: ", "assistant": "ASSISTANT: "},
                              turn_close="{{ ' ' if message['role'] == 'user' else eos_token }}",
                              generation_prompt="ASSISTANT:", system="prepend", image="<image>\n")
    tok = _vlm_tokenizer(["<s>", "</s>", "<pad>", "<image>"], template, bos="<s>", eos="</s>", pad="<pad>")
    config = LlavaConfig(
        vision_config=dict(_VISION_TOWER, model_type="clip_vision_model", projection_dim=32),
        text_config=_text_config(tok, "llama"), image_token_index=_ids(tok, "<image>")[0],
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    image_proc = CLIPImageProcessor(size={"shortest_edge": _PIXELS}, crop_size={"height": _PIXELS, "width": _PIXELS})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    _save_vlm(out, LlavaForConditionalGeneration(config), processor, tok)


def build_llava_onevision(out: Path) -> None:
    """llava-onevision-qwen2-0.5b-ov-hf: SigLIP tower, Qwen2 decoder, ChatML with <image> / <video>."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,  # deferred: transformers
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    template = _chat_template(turn_open=_IM_TURN, turn_close="<|im_end|>\n",
                              generation_prompt="<|im_start|>assistant\n",
                              image="<image>\n", video="<video>\n")
    tok = _vlm_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], template, bos=None,
                         eos="<|im_end|>", pad="<|endoftext|>")
    image_id, video_id = _ids(tok, "<image>", "<video>")
    grid = [[_PIXELS, _PIXELS]]  # one tile beside the base image: a fixed number of patches per image
    config = LlavaOnevisionConfig(
        vision_config=dict(_VISION_TOWER, model_type="siglip_vision_model"), text_config=_text_config(tok, "qwen2"),
        image_token_index=image_id, video_token_index=video_id, image_grid_pinpoints=grid,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    size = {"height": _PIXELS, "width": _PIXELS}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=template)
    _save_vlm(out, LlavaOnevisionForConditionalGeneration(config), processor, tok)


def build_gemma3(out: Path) -> None:
    """gemma-3-4b-it: SigLIP tower pooled to 4 tokens, <start_of_image>, system folded into the first turn."""
    from transformers import (  # deferred: transformers
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor)

    template = _chat_template(bos="{{ bos_token }}", system="prepend",
                              turn_open={"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"},
                              turn_close="<end_of_turn>\n", generation_prompt="<start_of_turn>model\n",
                              image="<start_of_image>")
    tok = _vlm_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>"], template, bos="<bos>", eos="<end_of_turn>",
                         pad="<pad>", extra_special_tokens={"boi_token": "<start_of_image>",
                                                            "eoi_token": "<end_of_image>",
                                                            "image_token": "<image_soft_token>"})
    boi, eoi, image_id = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config=_text_config(tok, "gemma3_text", query_pre_attn_scalar=16, sliding_window=64),
        vision_config=dict(_VISION_TOWER, model_type="siglip_vision_model"), mm_tokens_per_image=4,
        boi_token_index=boi, eoi_token_index=eoi, image_token_index=image_id, tie_word_embeddings=False)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": _PIXELS, "width": _PIXELS}),
                                tokenizer=tok, image_seq_length=4, chat_template=template)
    _save_vlm(out, Gemma3ForConditionalGeneration(config), processor, tok)


_IDEFICS_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                   "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}


def _idefics_template() -> str:
    return _chat_template(bos="<|im_start|>", turn_open={"user": "User:", "assistant": "Assistant:",
                                                         "system": "System:"},
                          turn_close="<end_of_utterance>\n", generation_prompt="Assistant:", image="<image>",
                          video="<video>")


def build_smolvlm(out: Path) -> None:
    """SmolVLM2-256M-Video-Instruct: SigLIP tower, pixel shuffle, Llama decoder; images and video."""
    from transformers import (  # deferred: transformers
        SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor,
        SmolVLMVideoProcessor)

    template = _idefics_template()
    tok = _vlm_tokenizer(["<|im_start|>", "<|endoftext|>", "<end_of_utterance>", *_IDEFICS_TOKENS.values(),
                          "<video>"], template, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                         extra_special_tokens={**_IDEFICS_TOKENS, "video_token": "<video>"})
    config = SmolVLMConfig(vision_config=dict(_VISION_TOWER), text_config=_text_config(tok, "llama"),
                           scale_factor=2, image_token_id=_ids(tok, "<image>")[0], tie_word_embeddings=False)
    edge = {"longest_edge": _PIXELS}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        tokenizer=tok, image_seq_len=4, chat_template=template)
    _save_vlm(out, SmolVLMForConditionalGeneration(config), processor, tok)


def build_idefics3(out: Path) -> None:
    """Idefics3-8B-Llama3: SigLIP tower, pixel shuffle, Llama decoder; images only."""
    from transformers import (  # deferred: transformers
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor)

    template = _idefics_template()
    tok = _vlm_tokenizer(["<|im_start|>", "<|endoftext|>", "<end_of_utterance>", *_IDEFICS_TOKENS.values()],
                         template, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    config = Idefics3Config(vision_config=dict(_VISION_TOWER), text_config=_text_config(tok, "llama"),
                            scale_factor=2, image_token_id=_ids(tok, "<image>")[0], tie_word_embeddings=False)
    edge = {"longest_edge": _PIXELS}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        tokenizer=tok, image_seq_len=4, chat_template=template)
    _save_vlm(out, Idefics3ForConditionalGeneration(config), processor, tok)


def build_internvl(out: Path) -> None:
    """InternVL3-1B-hf: InternViT tower, pixel shuffle, Qwen2 decoder, <img><IMG_CONTEXT>...</img>; images and
    video."""
    from transformers import (  # deferred: transformers
        GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
        InternVLVideoProcessor)

    template = _chat_template(turn_open=_IM_TURN, turn_close="<|im_end|>\n",
                              generation_prompt="<|im_start|>assistant\n",
                              image="<IMG_CONTEXT>\n", video="<video>\n")
    tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}
    tok = _vlm_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *tokens.values()], template, bos=None,
                         eos="<|im_end|>", pad="<|endoftext|>", extra_special_tokens=tokens)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[_PIXELS, _PIXELS], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision, text_config=_text_config(tok, "qwen2"),
                            image_token_id=_ids(tok, "<IMG_CONTEXT>")[0], image_seq_length=4, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    size = {"height": _PIXELS, "width": _PIXELS}
    image_proc = GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=2)
    processor = InternVLProcessor(image_processor=image_proc,
                                  video_processor=InternVLVideoProcessor(size=size), tokenizer=tok,
                                  image_seq_length=4, chat_template=template)
    _save_vlm(out, InternVLForConditionalGeneration(config), processor, tok)


def build_paligemma(out: Path) -> None:
    """paligemma-3b-mix-224: SigLIP tower before a Gemma decoder; no chat template: the processor puts the
    image tokens and bos before the question itself."""
    from transformers import (  # deferred: transformers
        PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor)

    tok = _fast_tokenizer(special=["<pad>", "<eos>", "<bos>", "<image>"], bos="<bos>", eos="<eos>", pad="<pad>",
                          chat_template=None, extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = None
    config = PaliGemmaConfig(
        vision_config=dict(_VISION_TOWER, model_type="siglip_vision_model", projection_dim=64),
        text_config=_text_config(tok, "gemma"), image_token_index=_ids(tok, "<image>")[0], projection_dim=64,
        hidden_size=64, tie_word_embeddings=False)
    image_proc = SiglipImageProcessor(size={"height": _PIXELS, "width": _PIXELS})
    image_proc.image_seq_length = 16  # (32 / 8) ** 2 patches, as the real one's 256 for 224 px
    processor = PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)
    _save_vlm(out, PaliGemmaForConditionalGeneration(config), processor, tok)


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------

class MatrixModel(NamedTuple):
    build: Callable[[Path], None]
    architecture: str   # transformers' model_type of the folder built
    repo_id: str        # the real checkpoint it stands for (what models.yaml would name)
    family: str         # the server family its config maps to (tests/test_matrix.py checks the family read
                        # from the built folder agrees)


_BUILT = {
    "llama": (build_llama, "llama"), "mistral": (build_mistral, "mistral"), "gemma2": (build_gemma2, "gemma2"),
    "phi3": (build_phi3, "phi3"), "granite": (build_granite, "granite"), "qwen2_vl": (build_qwen2_vl, "qwen2_vl"),
    "llava": (build_llava, "llava"), "llava_onevision": (build_llava_onevision, "llava_onevision"),
    "gemma3": (build_gemma3, "gemma3"), "smolvlm": (build_smolvlm, "smolvlm"), "idefics3": (build_idefics3, "idefics3"),
    "internvl": (build_internvl, "internvl"), "paligemma": (build_paligemma, "paligemma"),
}
# The keys, real repos and families are configuration (utils/config/schema.py DEMO_MATRIX: what --demo all
# serves); the builders are here.
MATRIX: dict[str, MatrixModel] = {key: MatrixModel(*_BUILT[key], *DEMO_MATRIX[key]) for key in DEMO_MATRIX}
MATRIX_KEYS = tuple(MATRIX)
