"""xgrammar vs llguidance vs outlines-core on our tokenizers: what picked the library behind
utils/engine/grammar.py (docs/structured-outputs.md).

For each tokenizer (the demo chat models' WordPiece, the demo Whisper's byte-level BPE, and a 32k
byte-level BPE trained here for a realistic vocabulary size) and each library:
  - tokenizer: seconds to read the vocabulary into the library;
  - compile:   seconds to compile one JSON schema (nested object, enum, bounded strings/integers, array);
  - mask:      microseconds to compute the next-token masks of 8 rows (one decode step at batch 8),
               median over the steps of 8 random walks;
  - valid:     walks (random allowed tokens, seeded) whose `tokenizer.decode` text parses as JSON and
               validates against the schema, of those that reached the end of the grammar.
The vocabulary given to each library is utils.engine.grammar.vocabulary (what each token adds to the
decoded answer), so all three see the same bytes; "own reader" rows also try each library's own
reading of the Hugging Face tokenizer.

    flock /tmp/heavy.lock timeout 900 .venv/bin/python bench/grammar_libraries.py [--out bench/results/grammar_libraries.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jsonschema  # noqa: E402
import torch  # noqa: E402

from utils.engine.grammar import Grammar, vocabulary  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                   "city": {"type": "string", "maxLength": 10}},
                  "required": ["age", "city"], "additionalProperties": False},
    },
    "required": ["name", "color", "count", "flags", "owner"],
    "additionalProperties": False,
}
ROWS, WALKS, MAX_STEPS = 8, 8, 400


def tokenizers(root: Path) -> dict:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from utils.hub.demo_models import build_demo_models
    paths = build_demo_models(root, ["deepseek", "whisper"])
    out = {"wordpiece-demo (deepseek)": AutoTokenizer.from_pretrained(paths["deepseek"]),
           "bpe-demo (whisper)": AutoTokenizer.from_pretrained(paths["whisper"])}
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = [p.read_text(errors="replace") for p in sorted(Path(json.__file__).parent.parent.rglob("*.py"))[:1500]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["bpe-32k (trained here)"] = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    return out


# ------------------------------------------------------------------ one adapter per library

class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab, own: bool = False):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)) if own else \
            xgr.TokenizerInfo(list(vocab.tokens), vocab_size=len(vocab.tokens), stop_token_ids=list(vocab.stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.size = len(vocab.tokens)

    def compile(self, schema):
        return self.compiler.compile_grammar(Grammar.json_schema(schema).build())  # as the server compiles it

    def matchers(self, compiled, n):
        self.bitmask = self.xgr.allocate_token_bitmask(n, self.size)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def masks(self, matchers, logits):
        for i, m in enumerate(matchers):
            if not m.is_terminated():
                m.fill_next_token_bitmask(self.bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    @staticmethod
    def advance(m, token):
        return m.accept_token(token)

    @staticmethod
    def done(m):
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab, own: bool = False):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg = llguidance
        if own:
            self.tokenizer = llguidance.hf.from_tokenizer(tok)
        else:
            class Wrapped:
                tokens = list(vocab.tokens)
                eos_token_id = vocab.stop_ids[0]
                bos_token_id = None
                special_token_ids = [i for i, t in enumerate(vocab.tokens) if not t]

                def __call__(self, text):
                    return tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text,
                                      add_special_tokens=False)
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
        self.size = len(vocab.tokens)

    def compile(self, schema):
        grammar = f'start: " "? body\nbody: %json {json.dumps(schema)}\n'  # the same leading space as ours
        self.llg.LLMatcher(self.tokenizer, grammar)  # compiling is building the first matcher
        return grammar

    def matchers(self, compiled, n):
        self.bitmask = self.llg.torch.allocate_token_bitmask(n, self.tokenizer.vocab_size)
        return [self.llg.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def masks(self, matchers, logits):
        for i, m in enumerate(matchers):
            self.llg.torch.fill_next_token_bitmask(m, self.bitmask, i)
        self.llg.torch.apply_token_bitmask_inplace(logits, self.bitmask[:, :(logits.shape[1] + 31) // 32])

    @staticmethod
    def advance(m, token):
        return m.consume_token(token) and not m.is_error()

    @staticmethod
    def done(m):
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab, own: bool = False):
        import outlines_core
        self.oc = outlines_core
        mapping: dict[bytes, list[int]] = {}
        for i, piece in enumerate(vocab.tokens):
            if piece and i not in vocab.stop_ids:
                mapping.setdefault(piece, []).append(i)
        self.vocab = outlines_core.Vocabulary(vocab.stop_ids[0], mapping)
        self.size = len(vocab.tokens)

    def compile(self, schema):
        regex = "[ ]?" + self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ \t\n]{0,16}")
        return self.oc.Index(regex, self.vocab)

    def matchers(self, compiled, n):
        self.mask = torch.zeros((n, (self.size + 31) // 32), dtype=torch.int32)
        return [self.oc.Guide(compiled) for _ in range(n)]

    def masks(self, matchers, logits):
        allowed = torch.zeros(logits.shape, dtype=torch.bool)
        for i, g in enumerate(matchers):
            allowed[i, g.get_tokens()] = True
        logits.masked_fill_(~allowed, float("-inf"))

    @staticmethod
    def advance(m, token):
        m.advance(token)
        return True

    @staticmethod
    def done(m):
        return m.is_finished()


LIBRARIES = (XGrammar, LLGuidance, OutlinesCore)


def measure(lib_class, tok, vocab, own=False) -> dict:
    started = time.perf_counter()
    lib = lib_class(tok, vocab, own=own)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = lib.compile(SCHEMA)
    compile_s = time.perf_counter() - started
    rng = random.Random(0)
    step_us, valid, complete, refused, errors = [], 0, 0, 0, []
    for walk in range(WALKS):
        rows = lib.matchers(compiled, ROWS)
        tokens = [[] for _ in range(ROWS)]
        open_rows = set(range(ROWS))
        for step in range(MAX_STEPS):
            logits = torch.zeros((ROWS, lib.size))
            t0 = time.perf_counter()
            lib.masks(rows, logits)
            step_us.append((time.perf_counter() - t0) * 1e6)
            for i in list(open_rows):
                allowed = torch.isfinite(logits[i]).nonzero().flatten().tolist()
                if step == 0:
                    allowed = [t for t in allowed if t not in vocab.not_first] or allowed
                if not allowed:
                    open_rows.discard(i)
                    continue
                stops = [t for t in allowed if t in vocab.stop_ids]
                token = stops[0] if stops and rng.random() < 0.5 else rng.choice(allowed)
                if not lib.advance(rows[i], token):
                    errors.append(f"refused a token its own mask allowed: {vocab.tokens[token]!r}")
                    refused += 1
                    open_rows.discard(i)
                    continue
                if token not in vocab.stop_ids:
                    tokens[i].append(token)
                if token in vocab.stop_ids or lib.done(rows[i]):
                    open_rows.discard(i)
                    complete += 1
                    text = tok.decode(tokens[i], skip_special_tokens=True)
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError) as exc:
                        errors.append(f"{text[:80]!r}: {str(exc)[:80]}")
            if not open_rows:
                break
    return {"tokenizer_s": round(tokenizer_s, 4), "compile_s": round(compile_s, 4),
            "mask_us_batch8": round(statistics.median(step_us), 1), "complete": complete,
            "valid": valid, "refused": refused, "walks": ROWS * WALKS, "errors": errors[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as root:
        for tok_name, tok in tokenizers(Path(root)).items():
            vocab = vocabulary(tok, {tok.eos_token_id})
            print(f"\n{tok_name}: {len(vocab.tokens)} tokens")
            for lib_class in LIBRARIES:
                for own in ((False, True) if lib_class is not OutlinesCore else (False,)):
                    label = lib_class.name + (" (own reader)" if own else "")
                    try:
                        row = measure(lib_class, tok, vocab, own=own)
                    except Exception as exc:  # a library that cannot take this tokenizer or schema
                        row = {"failed": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    results.append({"tokenizer": tok_name, "library": label, **row})
                    print(f"  {label:28s} " + (row["failed"] if "failed" in row else
                          f"tokenizer {row['tokenizer_s']:.3f}s  compile {row['compile_s']:.4f}s  "
                          f"mask@8 {row['mask_us_batch8']:8.1f} us  valid {row['valid']}/{row['complete']} "
                          f"complete of {row['walks']}, {row['refused']} refused" + (f"  e.g. {row['errors'][0]}" if row["errors"] else "")))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
