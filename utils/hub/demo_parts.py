"""The pieces every demo checkpoint builder shares (utils/hub/demo_models.py, demo_speech_janus.py):
the offline WordPiece tokenizers, the vocabulary they cover, silencing the lm_head rows of special
tokens, and the generation config. torch, tokenizers and transformers are imported on use, as in the
builders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

_WORDS = """
the a an of to and in is it you that he she was for on are with as i his her they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said each
which do their time if will way about many then them write would like so these long make thing see him
two has look more day could go come did number sound no most people my over know water than call first
who may down side been now find any new work part take get place made live where after back little only
round man woman year came show every good me give our under name very through just form sentence great
think say help low line differ turn cause much mean before move right boy girl old too same tell does set
three four five six seven eight nine ten want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light kind off need house
picture image photo video audio sound music voice speech frame clip scene color colour cat dog bird fish
horse cow red blue green yellow black white orange purple brown gray pink yes sky tree car bus train
road street city park river sea beach mountain snow rain sun moon star night morning table chair door
window room bed book phone computer screen ball game food apple banana pizza cake coffee tea cup glass
plate person child children baby face eye ear mouth smile sit stand walk run jump hold open close left
top bottom front behind between inside outside near far happy sad loud quiet fast slow hello thanks
please answer question because maybe think reason step first second last next final result
user assistant system helpful
""".split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_PUNCT = list(".,!?;:'\"()-[]{}<>/\\@#$%^&*_+=|~`")


def _wordpiece_vocab(head: list[str]) -> dict[str, int]:
    tokens = list(head) + _WORDS + _CHARS + ["##" + c for c in _CHARS] + _PUNCT
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def _wordpiece_tokenizer(vocab: dict[str, int], unk: str):
    """A `tokenizers.Tokenizer`: lowercase, split on whitespace/punctuation, WordPiece with char fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers  # deferred: tokenizers

    tk = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tk


def _fast_tokenizer(
    *,
    special: list[str],
    added: list[str] = (),
    bos: str | None,
    eos: str,
    pad: str,
    chat_template: str,
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int = 32768,
):
    """PreTrainedTokenizerFast over the WordPiece vocab; `special` tokens come after the vocab, like Qwen's."""
    from tokenizers import AddedToken  # deferred: tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: transformers

    unk = "<unk>"
    tk = _wordpiece_tokenizer(_wordpiece_vocab([unk]), unk)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if added:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    kwargs: dict[str, Any] = {}
    if extra_special_tokens:
        kwargs["extra_special_tokens"] = extra_special_tokens
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tok.chat_template = chat_template
    return tok


def _vocab_size(tok) -> int:
    """Model vocab size: the tokenizer's, rounded up to a multiple of 64 (like the real checkpoints' padding)."""
    return (len(tok) + 63) // 64 * 64


def _keep_only_word_logits(lm_head, tok) -> None:
    """Zero the lm_head rows of every token that is not a whole English word (special/added tokens, single
    characters, ## pieces, punctuation, vocab padding). Their logits are then exactly 0 while word logits are
    random, and the max of hundreds of random logits is > 0: greedy decoding of the random model emits
    readable space-separated words, never EOS at step one and never a media placeholder."""
    import torch  # deferred: torch

    vocab = tok.get_vocab()
    keep = torch.zeros(lm_head.weight.shape[0], dtype=torch.bool)
    keep[[vocab[w] for w in _WORDS if w in vocab]] = True
    with torch.no_grad():
        lm_head.weight[~keep] = 0.0
        if getattr(lm_head, "bias", None) is not None:
            lm_head.bias[~keep] = 0.0


# --- chat templates --------------------------------------------------------------------------------

def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    for t, i in zip(tokens, ids):
        if i is None or i == tok.unk_token_id:
            raise RuntimeError(f"token {t!r} missing from the demo tokenizer")
    return ids


def _write_generation_config(path: Path, **kwargs) -> None:
    from transformers import GenerationConfig  # deferred: transformers

    gen = GenerationConfig(**kwargs)
    gen.save_pretrained(path)


# Shared by the Qwen-style builders (demo_models.py, demo_matrix.py).
# Qwen special tokens in the real order (ids are offsets after the word vocab here).
_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}  # sums to head_dim/2


def _vision_processors(cls_image, cls_video):
    # Real patch 14 / merge 2 / temporal 2; small pixel budgets keep every image at 4..16 merged tokens.
    common = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    image = cls_image(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, **common)
    # cap_pixels_per_frame bounds long videos by max_video_tokens (and silences a FutureWarning).
    video = cls_video(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 8, cap_pixels_per_frame=True,
                      max_video_tokens=256, **common)
    return image, video
