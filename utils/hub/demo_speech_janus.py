"""Tiny random-weight checkpoints of Janus-Pro (understanding and drawing) and Whisper, for
utils/hub/demo_models.py (keys `janus` and `whisper`). Same rules as there: real configs, real processors
and tokenizers built offline, float32 weights, seeded by the caller.

    janus    JanusForConditionalGeneration (Llama text model, SigLIP-style vision tower, VQ-VAE image
             decoder and generation head) + JanusProcessor; draws 64x64 images from 16 image tokens
    whisper  WhisperForConditionalGeneration (128 mel bins, as whisper-large-v3) + WhisperProcessor whose
             byte-level BPE tokenizer carries Whisper's real special tokens: <|startoftranscript|>, the 100
             language tokens, <|translate|>, <|transcribe|>, <|startofprev|>, <|nospeech|>,
             <|notimestamps|> and the 1501 timestamp tokens <|0.00|> ... <|30.00|>
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.hub.demo_parts import (_WORDS, _fast_tokenizer, _ids, _keep_only_word_logits, _vocab_size,
                                  _write_generation_config)

# Janus-Pro's own chat template (transformers' convert_janus_weights_to_hf.py writes this one).
JANUS_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: "
    "{%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}"
    "{%else%}{{text}}{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)


def build_janus(out: Path) -> None:
    import torch  # deferred: torch
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,  # deferred: transformers
                              JanusProcessor)

    bos, eos, pad = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    image, boi, eoi = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
    tok = _fast_tokenizer(special=[bos, eos, pad, image, boi, eoi], bos=bos, eos=eos, pad=pad,
                          chat_template=JANUS_TEMPLATE, model_max_length=16384,
                          extra_special_tokens={"image_token": image, "boi_token": boi, "eoi_token": eoi})
    bos_id, eos_id, pad_id, image_id, boi_id = _ids(tok, bos, eos, pad, image, boi)
    # Understanding: a 32x32 image in 8x8 patches = 16 image tokens. Drawing: the same 4x4 grid of VQ codes,
    # decoded 16x up (five resolutions, as the real VQ-16) into a 64x64 image (the real one: 24x24 -> 384x384).
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=_vocab_size(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=16384, bos_token_id=bos_id, eos_token_id=eos_id,
                         pad_token_id=pad_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=64, depth=2, num_image_tokens=16, mlp_ratio=2.0),
        vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, projection_dim=64,
                       image_token_embed_dim=64, num_hidden_layers=1),
        image_token_id=image_id, tie_word_embeddings=False,
    )
    model = JanusForConditionalGeneration(config)
    _keep_only_word_logits(model.lm_head, tok)
    # Random init leaves the image-code logits near 0 (std ~0.01): every code equally likely, whatever the
    # prompt or CFG weight. Scaled up, codes follow the prompt and the weight steers them, as in a real model.
    with torch.no_grad():
        model.model.generation_head.proj_out.weight.mul_(60.0)
    model.save_pretrained(out)
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": 32, "width": 32}, min_size=14),
                               tokenizer=tok, chat_template=JANUS_TEMPLATE, use_default_system_prompt=True,
                               num_image_tokens=16)
    processor.save_pretrained(out)
    # As the converted Janus-Pro checkpoints: CFG weight 5, temperature 1, the pad and <begin_of_image> ids.
    _write_generation_config(out, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, guidance_scale=5,
                             temperature=1.0, generation_kwargs={"boi_token_id": boi_id})


def _whisper_tokenizer():
    """Byte-level BPE over the demo words (trained here, offline) wrapped in WhisperTokenizer, then
    Whisper's special tokens in the real order: <|endoftext|> right after the BPE vocab, the task and
    language tokens, <|notimestamps|> last among the specials, and the timestamps after it (ordinary
    added tokens, as in the real tokenizer: timestamp ids start after the last special id)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers  # deferred: tokenizers
    from transformers import WhisperTokenizer  # deferred: transformers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES  # deferred: transformers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 12)]
                            + [" " + word for word in _WORDS], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = WhisperTokenizer(vocab=trained["vocab"], merges=merges, model_max_length=448)
    specials = (["<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
                    for i in range(1501)])
    return tok, list(LANGUAGES)


def build_whisper(out: Path) -> None:
    import torch  # deferred: torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,  # deferred: transformers
                              WhisperForConditionalGeneration, WhisperProcessor)

    tok, languages = _whisper_tokenizer()
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    # 30 s windows as the real model (3000 mel frames -> 1500 encoder positions); 128 mel bins as large-v3.
    config = WhisperConfig(vocab_size=_vocab_size(tok), num_mel_bins=128, d_model=32, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                           max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           decoder_start_token_id=sot, tie_word_embeddings=False)
    model = WhisperForConditionalGeneration(config)
    # Untied output rows (the real model ties them to the embeddings): only whole words (" cat") keep
    # random rows, scaled so a word always beats the 1501 timestamp tokens' summed probability. Greedy
    # decoding then writes readable words, never <|endoftext|>, and a timestamped window is one segment
    # that ends where the window ends: long audio advances 30 s per window, as on silence-free speech.
    vocab = tok.get_vocab()
    keep = torch.zeros(model.proj_out.weight.shape[0], dtype=torch.bool)
    keep[[i for token, i in vocab.items() if token.startswith("Ġ") and token[1:].isalpha()]] = True
    with torch.no_grad():
        model.proj_out.weight[~keep] = 0.0
        model.proj_out.weight[keep] *= 100.0
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot, max_length=448,
        is_multilingual=True, lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in languages},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50, begin_suppress_tokens=[eot], suppress_tokens=[],
        alignment_heads=[[1, 0], [1, 1]], return_timestamps=False)
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
                     tokenizer=tok).save_pretrained(out)
