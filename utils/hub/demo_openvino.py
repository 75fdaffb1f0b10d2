"""The demo checkpoint served through OpenVINO: a tiny Qwen3 with a byte-level BPE tokenizer.

Why its own tokenizer: openvino-tokenizers converts the other demo checkpoints' WordPiece tokenizers
wrongly (every special token becomes id 0), while a byte-level BPE (what Qwen ships) with the same
special ids after the vocabulary converts as it should. The BPE is trained offline with `tokenizers`
on the demo word list, so any text tokenizes (bytes are the fallback) and nothing is downloaded.

The weights are random (float32, seeded); the lm_head rows of every token that is not a whole word
(special tokens, byte pieces, fragments) are zeroed, so greedy decoding emits readable words and never
EOS at once: generation always runs to max_new_tokens, as with the other demo checkpoints.
"""
from __future__ import annotations

import re
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"
# ChatML, as Qwen3 renders a text conversation (content a string or a list of text parts).
TEMPLATE = (
    "{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- elif content -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}{{ text(message['content']) }}"
    "{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_WORD_TOKEN = re.compile(r"^\u0120[a-z]{2,}$")  # "Ġword": a whole word after a space, in byte-level form


def byte_level_tokenizer(words: list[str], vocab_size: int = 1024):
    """PreTrainedTokenizerFast: byte-level BPE trained on `words`, Qwen's special tokens after it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # deferred: tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: transformers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)]
    tk.train_from_iterator(corpus, trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=PAD, model_max_length=32768,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = TEMPLATE
    return tok


def build_openvino_demo(out: Path, words: list[str], text_sizes: dict) -> None:
    """Writes the checkpoint (config, safetensors, tokenizer, generation config) into `out`."""
    import torch  # deferred: torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM  # deferred: transformers

    tok = byte_level_tokenizer(words)
    eos_id, pad_id = tok.convert_tokens_to_ids([EOS, PAD])
    config = Qwen3Config(vocab_size=(len(tok) + 63) // 64 * 64, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, **text_sizes)
    model = Qwen3ForCausalLM(config)
    keep = torch.zeros(config.vocab_size, dtype=torch.bool)
    keep[[i for token, i in tok.get_vocab().items() if _WORD_TOKEN.match(token)]] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False).save_pretrained(out)
