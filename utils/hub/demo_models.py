"""Tiny random-weight checkpoints of the real architectures, for `main.py --demo` and the tests.

Each key builds one directory that loads through the same classes as the real model:

    deepseek    Qwen3ForCausalLM (DeepSeek-R1-0528-Qwen3-8B layout) + tokenizer with R1 special tokens
    qwen_vl     Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor (image + video)
    blip_vqa    BlipForQuestionAnswering + BlipProcessor
    qwen_audio  Qwen2AudioForConditionalGeneration + Qwen2AudioProcessor
    qwen_omni   Qwen2_5OmniForConditionalGeneration (thinker only, audio output off) + Qwen2_5OmniProcessor
    flux        FluxPipeline (FLUX.1-schnell layout): 1+1-layer FluxTransformer2DModel, AutoencoderKL, CLIP + T5
                text encoders with their tokenizers, FlowMatchEulerDiscreteScheduler
    qwen_image_edit  QwenImageEditPipeline: QwenImageTransformer2DModel, AutoencoderKLQwenImage, a Qwen2.5-VL
                text encoder + Qwen2VLProcessor
    janus       JanusForConditionalGeneration + JanusProcessor (understands and draws; utils/hub/demo_speech_janus.py)
    whisper     WhisperForConditionalGeneration + WhisperProcessor (utils/hub/demo_speech_janus.py)

Weights are float32, seeded per key (deterministic), saved as safetensors. Tokenizers are built offline
with `tokenizers` (WordPiece over a few hundred English words plus single characters, so any ASCII text
tokenizes and `decode()` gives space-separated words). The lm_head rows of every added/special token are
zeroed, so greedy decoding of the random model never emits EOS or a media placeholder: generation always
yields the requested number of new tokens.

Builds are cached: a directory with a `.demo_checkpoint` marker of the current DEMO_VERSION is reused.
Concurrent builders serialise on an fcntl lock (root/.demo.lock); each key is written to a temp dir inside
root and renamed into place after the marker is written, so a half-built dir never looks complete.

    python -m utils.hub.demo_models [--root DIR] [--force] [--keys k1,k2]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from utils.config.schema import DEMO_KEYS, DEMO_MATRIX
from utils.hub import demo_speech_janus
from utils.hub import demo_matrix
from utils.hub.demo_parts import (_MROPE, _QWEN_SPECIAL, _fast_tokenizer, _ids, _keep_only_word_logits,
                                  _vision_processors, _vocab_size, _wordpiece_tokenizer, _wordpiece_vocab,
                                  _write_generation_config)

__all__ = ["DEMO_KEYS", "DEMO_VERSION", "DEFAULT_ROOT", "MARKER_NAME", "all_demo_keys", "build_demo_models",
           "demo_family"]

log = logging.getLogger(__name__)

DEMO_VERSION = 3  # 2: the deepseek tokenizer's tools (template and tool-call tokens); 3: janus, whisper
MARKER_NAME = ".demo_checkpoint"
LOCK_NAME = ".demo.lock"
_TMP_PREFIX = ".building-"
_TRASH_PREFIX = ".stale-"

_FAMILIES = {
    "deepseek": "text",
    "qwen_vl": "vision_language",
    "blip_vqa": "vqa",
    "qwen_audio": "audio",
    "qwen_omni": "omni",
    "flux": "text_to_image",
    "qwen_image_edit": "image_edit",
    "janus": "janus",
    "whisper": "speech_to_text",
}
_SEEDS = {key: 1000 + i for i, key in enumerate(DEMO_KEYS)}

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "models" / "demo"


def demo_family(key: str) -> str:
    """The server family ("text" | "vision_language" | "vqa" | "audio" | "omni" ...) of a demo key (the
    default set or the architecture matrix of utils/hub/demo_matrix.py)."""
    if key in _FAMILIES:
        return _FAMILIES[key]
    if key in DEMO_MATRIX:
        return DEMO_MATRIX[key][1]
    raise KeyError(f"unknown demo model {key!r}; known: {', '.join(all_demo_keys())}")


def all_demo_keys() -> tuple[str, ...]:
    """The default demo set and the architecture matrix (`main.py --demo all`)."""
    return DEMO_KEYS + tuple(DEMO_MATRIX)


def _builder(key: str) -> Callable[[Path], None]:
    return _BUILDERS[key] if key in _BUILDERS else demo_matrix.MATRIX[key].build


def _seed(key: str) -> int:
    return _SEEDS[key] if key in _SEEDS else 2000 + list(DEMO_MATRIX).index(key)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

# DeepSeek-R1-0528 in spirit: bos + system prompt, <｜User｜>/<｜Assistant｜> turns, reasoning before
# </think> is dropped from past assistant turns; content may be a string or a list of text parts.
# Tools as R1-0528 / V3 render them: the functions listed in the system prompt, an assistant's calls
# as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name ```json args ```<｜tool▁call▁end｜>
# ...<｜tool▁calls▁end｜>, tool results between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>, after
# which the model answers without a new <｜Assistant｜>. Without tools it renders as before.
_DEEPSEEK_TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                         "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                         "<｜tool▁output▁end｜>"]
_DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- macro text(content) -%}{%- if content is none -%}{%- elif content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- set ns = namespace(system_prompt='', is_tool=false, after_tool=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system_prompt = ns.system_prompt + text(message['content']) -%}{%- endif -%}{%- endfor -%}"
    "{%- if tools is defined and tools -%}"
    "{%- set ns.system_prompt = ns.system_prompt + ('\n\n' if ns.system_prompt else '') + '## Tools\n\n"
    "You have the following functions available:\n' -%}"
    "{%- for tool in tools -%}{%- set ns.system_prompt = ns.system_prompt + '\n```json\n' + (tool | tojson) + "
    "'\n```\n' -%}{%- endfor -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '\nTo call functions, write: <｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>FUNCTION_NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜>"
    "<｜tool▁calls▁end｜>' -%}"
    "{%- endif -%}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'tool' and ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}"
    "{%- set ns.is_tool = false -%}{%- set ns.after_tool = true -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + text(message['content']) }}"
    "{%- elif message['role'] == 'assistant' -%}{%- set content = text(message['content']) -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{ ('' if ns.after_tool else '<｜Assistant｜>') + content }}"
    "{%- if message['tool_calls'] -%}{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] -%}{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{{ '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n' + "
    "call['function']['arguments'] + '\n```<｜tool▁call▁end｜>' }}{%- endfor -%}{{ '<｜tool▁calls▁end｜>' }}"
    "{%- endif -%}{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '\n' if ns.is_tool else '<｜tool▁outputs▁begin｜>' }}{%- set ns.is_tool = true -%}"
    "{{ '<｜tool▁output▁begin｜>' + text(message['content']) + '<｜tool▁output▁end｜>' }}"
    "{%- endif -%}{%- set ns.after_tool = false -%}{%- endfor -%}"
    "{%- if ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}"
    "{%- elif add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

_QWEN_SYSTEM = (
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
)

# Qwen2.5-VL's own template.
_QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}" + _QWEN_SYSTEM + "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-Audio-7B-Instruct's own template.
_QWEN_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}" + _QWEN_SYSTEM + "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Omni's own template (shorter default system prompt).
_QWEN_OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}" + _QWEN_SYSTEM + "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' or 'text' in content %}"
    "{{ content['text'] if 'text' in content else content['content'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)




# --------------------------------------------------------------------------------------------------
# Builders: each writes one complete checkpoint into `out` (an empty dir).
# --------------------------------------------------------------------------------------------------

# Text sizes shared by the Qwen-style decoders (bitsandbytes 4-bit on CPU wants in % 64, out % 32).
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False)



def _build_deepseek(out: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM  # deferred: transformers

    bos, eos, pad = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    tok = _fast_tokenizer(
        special=[bos, eos, pad, "<｜User｜>", "<｜Assistant｜>"],
        added=["<think>", "</think>"] + _DEEPSEEK_TOOL_TOKENS,  # not special, as in the real tokenizer: decoded
        bos=bos, eos=eos, pad=pad, chat_template=_DEEPSEEK_TEMPLATE,
    )
    bos_id, eos_id, pad_id = _ids(tok, bos, eos, pad)
    config = Qwen3Config(
        vocab_size=_vocab_size(tok), head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, **_TEXT,
    )
    model = Qwen3ForCausalLM(config)
    _keep_only_word_logits(model.lm_head, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_generation_config(out, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                             do_sample=False)


def _qwen_tokenizer(extra: list[str], template: str, extra_special_tokens: dict[str, str] | None = None):
    return _fast_tokenizer(
        special=_QWEN_SPECIAL + extra, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        chat_template=template, extra_special_tokens=extra_special_tokens,
    )


_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=64)


def _build_qwen_vl(out: Path) -> None:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,  # deferred: transformers
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tokenizer([], _QWEN_VL_TEMPLATE)
    pad_id, eos_id, image_id, video_id, vs_id, ve_id = _ids(
        tok, "<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=_vocab_size(tok), rope_parameters=dict(_MROPE), bos_token_id=pad_id,
                         eos_token_id=eos_id, pad_token_id=pad_id, **_TEXT),
        vision_config=dict(_VISION, tokens_per_second=2),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
        tie_word_embeddings=False, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    _keep_only_word_logits(model.lm_head, tok)
    model.save_pretrained(out)
    image_proc, video_proc = _vision_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                        chat_template=_QWEN_VL_TEMPLATE).save_pretrained(out)
    _write_generation_config(out, bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
                             do_sample=False)


def _build_blip_vqa(out: Path) -> None:
    from tokenizers import processors  # deferred: tokenizers
    from transformers import (BertTokenizerFast, BlipConfig, BlipForQuestionAnswering,  # deferred: transformers
                              BlipImageProcessor, BlipProcessor)

    head = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = _wordpiece_vocab(head)
    vocab["[DEC]"] = len(vocab)  # BLIP's decoder bos, an extra token after the vocab as in blip-vqa-base
    vocab["[ENC]"] = len(vocab)
    tk = _wordpiece_tokenizer(vocab, "[UNK]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    from tokenizers import AddedToken  # deferred: tokenizers

    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in head + ["[DEC]", "[ENC]"]])
    tok = BertTokenizerFast(
        tokenizer_object=tk, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]", model_max_length=512,
        extra_special_tokens=None,
    )
    size = 64
    config = BlipConfig(
        text_config=dict(vocab_size=_vocab_size(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
                         bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"], sep_token_id=vocab["[SEP]"],
                         pad_token_id=vocab["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=size, patch_size=16, projection_dim=32),
        projection_dim=32, image_text_hidden_size=32,
    )
    model = BlipForQuestionAnswering(config)
    _keep_only_word_logits(model.text_decoder.cls.predictions.decoder, tok)
    model.save_pretrained(out)
    image_proc = BlipImageProcessor(size={"height": size, "width": size})
    BlipProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)


_AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def _build_qwen_audio(out: Path) -> None:
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,  # deferred: transformers
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    tok = _qwen_tokenizer(_AUDIO_TOKENS, _QWEN_AUDIO_TEMPLATE)
    pad_id, eos_id, audio_id = _ids(tok, "<|endoftext|>", "<|im_end|>", "<|AUDIO|>")
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=_vocab_size(tok), bos_token_id=pad_id, eos_token_id=eos_id,
                         pad_token_id=pad_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         **_TEXT),
        audio_token_index=audio_id, pad_token_id=pad_id,
    )
    model = Qwen2AudioForConditionalGeneration(config)
    _keep_only_word_logits(model.get_output_embeddings(), tok)
    model.save_pretrained(out)
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=_QWEN_AUDIO_TEMPLATE).save_pretrained(out)
    _write_generation_config(out, bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
                             do_sample=False)


_OMNI_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>",
                "<|VIDEO|>"]


def _build_qwen_omni(out: Path) -> None:
    import torch  # deferred: torch
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration,  # deferred: transformers
                              Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    # The real Omni tokenizer names vision tokens <|vision_bos|>/<|vision_eos|>/<|IMAGE|>/<|VIDEO|>; the
    # processor reads these attributes from the tokenizer.
    extra = {
        "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    }
    special = [t for t in _QWEN_SPECIAL if t not in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                     "<|video_pad|>")]
    tok = _fast_tokenizer(special=special + _OMNI_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          chat_template=_QWEN_OMNI_TEMPLATE, extra_special_tokens=extra)
    pad_id, eos_id, image_id, video_id, audio_id, vs_id, ve_id, as_id, ae_id, user_id = _ids(
        tok, "<|endoftext|>", "<|im_end|>", "<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>",
        "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>", "user")
    thinker = dict(
        text_config=dict(vocab_size=_vocab_size(tok), rope_parameters=dict(_MROPE), bos_token_id=pad_id,
                         eos_token_id=eos_id, pad_token_id=pad_id, **_TEXT),
        vision_config=dict(_VISION),
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=64),
        image_token_index=image_id, video_token_index=video_id, audio_token_index=audio_id,
        audio_start_token_id=as_id, audio_end_token_id=ae_id, vision_start_token_id=vs_id,
        vision_end_token_id=ve_id, user_token_id=user_id, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    # Talker/token2wav are never built (enable_audio_output=False, as the server loads it); tiny configs keep
    # an accidental enable_audio_output=True small and their token ids inside the vocab (no load warnings).
    spare = len(tok)  # vocab padding rows stand in for the tts text tokens the real vocab has
    talker = dict(
        vocab_size=8448, embedding_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=dict(_MROPE),
        audio_token_index=audio_id, image_token_index=image_id, video_token_index=video_id,
        vision_start_token_id=vs_id, vision_end_token_id=ve_id, audio_start_token_id=as_id, audio_end_token_id=ae_id,
        tts_text_start_token_id=spare, tts_text_end_token_id=spare + 1, tts_text_pad_token_id=spare + 2,
    )
    token2wav = dict(
        dit_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32, emb_dim=32,
                        enc_emb_dim=32, enc_dim=32, enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16,
                        enc_se_channels=16, look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan_config=dict(upsample_initial_channel=64),
    )
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav,
                               enable_audio_output=False)
    model = Qwen2_5OmniForConditionalGeneration(config)
    _keep_only_word_logits(model.thinker.lm_head, tok)
    model.save_pretrained(out)
    # from_pretrained requires a speaker file even with audio output off; the real one maps names to
    # {"cond", "ref_mel", "bos_token"}.
    gen = torch.Generator().manual_seed(0)
    torch.save({name: {"cond": torch.randn(192, generator=gen), "ref_mel": torch.randn(1, 8, 80, generator=gen),
                       "bos_token": bos}
                for name, bos in (("Chelsie", 8293), ("Ethan", 8294))}, out / "spk_dict.pt")
    image_proc, video_proc = _vision_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    Qwen2_5OmniProcessor(image_processor=image_proc, video_processor=video_proc, feature_extractor=fe,
                         tokenizer=tok, chat_template=_QWEN_OMNI_TEMPLATE).save_pretrained(out)
    _write_generation_config(out, bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
                             do_sample=False)


# --- diffusers pipelines: the same components as the real repos, each a few KB. Their VAEs downsample
# 8x like the real ones (so sizes are multiples of 16, as for the real models).

def _special_tokenizer(head: list[str], *, bos: str | None, eos: str, pad: str, max_length: int):
    """A WordPiece PreTrainedTokenizerFast that wraps every text as [bos] text eos, like CLIP's and T5's."""
    from tokenizers import AddedToken, processors  # deferred: tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: transformers

    vocab = _wordpiece_vocab(head)
    tk = _wordpiece_tokenizer(vocab, "<unk>")
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
                                   model_max_length=max_length, clean_up_tokenization_spaces=False)


def _build_flux(out: Path) -> None:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # deferred: diffusers
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # deferred: transformers

    clip_tok = _special_tokenizer(["<|startoftext|>", "<|endoftext|>", "<unk>"], bos="<|startoftext|>",
                                  eos="<|endoftext|>", pad="<|endoftext|>", max_length=77)
    t5_tok = _special_tokenizer(["<pad>", "</s>", "<unk>"], bos=None, eos="</s>", pad="<pad>", max_length=512)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=_vocab_size(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=_vocab_size(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id,
                                 eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    # FLUX.1-schnell: no guidance embedding; 16 latent channels packed 2x2 -> 64 (here 4 -> 16).
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035, sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=1.0, use_dynamic_shifting=False)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                 tokenizer_2=t5_tok, transformer=transformer).save_pretrained(out)


def _build_qwen_image_edit(out: Path) -> None:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,  # deferred: diffusers
                           QwenImageEditPipeline, QwenImageTransformer2DModel)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,  # deferred: transformers
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tokenizer([], _QWEN_VL_TEMPLATE)
    pad_id, eos_id, image_id, video_id, vs_id, ve_id = _ids(
        tok, "<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    hidden = 32  # the text encoder's width = the transformer's joint_attention_dim
    config = Qwen2_5_VLConfig(
        text_config=dict(_TEXT, vocab_size=_vocab_size(tok), hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         rope_parameters=dict(_MROPE), bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id),
        vision_config=dict(_VISION, depth=1, fullatt_block_indexes=[0], out_hidden_size=hidden),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
        tie_word_embeddings=False, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    image_proc, video_proc = _vision_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                 chat_template=_QWEN_VL_TEMPLATE)
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                use_dynamic_shifting=True, time_shift_type="exponential")
    QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, processor=processor,
                          transformer=transformer).save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "deepseek": _build_deepseek,
    "qwen_vl": _build_qwen_vl,
    "blip_vqa": _build_blip_vqa,
    "qwen_audio": _build_qwen_audio,
    "qwen_omni": _build_qwen_omni,
    "flux": _build_flux,
    "qwen_image_edit": _build_qwen_image_edit,
    "janus": demo_speech_janus.build_janus,
    "whisper": demo_speech_janus.build_whisper,
}


# --------------------------------------------------------------------------------------------------
# Cache, lock, atomic placement
# --------------------------------------------------------------------------------------------------

def _is_current(path: Path) -> bool:
    try:
        data = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("version") == DEMO_VERSION


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / LOCK_NAME, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_one(root: Path, key: str) -> Path:
    import torch  # deferred: torch
    from transformers.utils import logging as hf_logging  # deferred: transformers

    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the checkpoint should look like any other dir
        started = time.perf_counter()
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(key))
                _builder(key)(tmp)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        import transformers  # deferred: transformers

        marker = {"version": DEMO_VERSION, "key": key, "family": demo_family(key),
                  "transformers": transformers.__version__, "built_at": time.time()}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        if final.exists() or final.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{key}-", dir=root))
            os.rename(final, trash / key)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        log.info("built demo checkpoint %s in %.2f s", final, time.perf_counter() - started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _sweep_leftovers(root: Path) -> None:
    """Remove temp/trash dirs of builders that died; only called while holding the lock."""
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)


def build_demo_models(root: Path, keys: Iterable[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    """Build root/<key>/ for each key (all by default) and return key -> dir.

    A key whose dir holds a `.demo_checkpoint` marker with the current DEMO_VERSION is skipped (unless
    `force`). Safe when several processes call it at once: they serialise on an fcntl lock on
    root/.demo.lock, and each checkpoint is written to a temp dir inside root and renamed into place.
    """
    if isinstance(keys, str):
        keys = [keys]
    wanted = list(DEMO_KEYS if keys is None else dict.fromkeys(keys))
    for key in wanted:
        demo_family(key)  # validates
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    if not force and all(_is_current(root / k) for k in wanted):
        return {k: root / k for k in wanted}
    with _locked(root):
        _sweep_leftovers(root)
        for key in wanted:
            path = root / key
            if force or not _is_current(path):
                path = _build_one(root, key)
            result[key] = path
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.hub.demo_models", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"target dir (default {DEFAULT_ROOT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when a current checkpoint exists")
    parser.add_argument("--keys", default=None, help=f"comma-separated subset of {','.join(DEMO_KEYS)} or of the "
                                                     f"matrix (utils/hub/demo_matrix.py); 'all': both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    if keys == ["all"]:
        keys = list(all_demo_keys())
    started = time.perf_counter()
    try:
        paths = build_demo_models(args.root, keys, force=args.force)
    except KeyError as exc:
        parser.error(str(exc))
    for key, path in paths.items():
        print(f"{key}\t{demo_family(key)}\t{path}")
    print(f"# {len(paths)} demo checkpoints ready in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
