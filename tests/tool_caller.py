"""The `caller` demo model: the demo text model rewired so that it really writes one DeepSeek-format
tool call, and a plain answer after the tool's result (shared by the tests that drive tools through
clients: tests/conftest.py's caller_server)."""
from __future__ import annotations

import shutil
from pathlib import Path

CALLER_YAML = """
  caller:        # the demo text model rewired to answer with one tool call, then with words after its result
    repo_id: test/caller
    family: text
    path: demo/caller
    generation: {max_new_tokens: 16}
"""
CALL_CHAIN = ["<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>",
              "lookup_weather", '{"city": "Paris"}', "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜end▁of▁sentence｜>"]
ANSWER_CHAIN = ["<｜tool▁outputs▁end｜>", "the", "sun", "is", "hot", "<｜end▁of▁sentence｜>"]


def build_caller(demo: Path) -> None:
    """demo/caller: the demo text model with its layers' outputs zeroed, so each next token depends on
    the last one only, and those of two chains wired in: after <｜Assistant｜> the model writes one
    DeepSeek tool call, after the tool results it answers "the sun is hot"."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = demo / "caller"
    if target.exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(demo / "deepseek")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in ("function", "lookup_weather", '{"city": "Paris"}')])
    model = AutoModelForCausalLM.from_pretrained(demo / "deepseek", dtype=torch.float32)
    assert len(tokenizer) <= model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        state = 0
        for chain in (CALL_CHAIN, ANSWER_CHAIN):
            ids = tokenizer.convert_tokens_to_ids(chain)
            assert tokenizer.unk_token_id not in ids
            for here, following in zip(ids, ids[1:]):  # one basis direction per state: here -> following
                embed[here] = 0.0
                embed[here, state] = 1.0
                head[:, state] = 0.0
                head[following, state] = 5.0
                state += 1
    staging = target.with_name("caller.building")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.copy(demo / "deepseek" / "generation_config.json", staging / "generation_config.json")
    staging.rename(target)
