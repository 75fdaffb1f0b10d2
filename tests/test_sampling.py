"""Per-row sampling (utils/engine/sampling.py) on both engines, on the real tiny text checkpoint:
penalties and biases against a reference written here over the same model's logits, rows of one
batch equal to their solo answers, seeds that do not depend on the neighbours, logprobs."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from utils.engine import Engine
from utils.engine.continuous import ContinuousEngine
from utils.families import GenerationParams, GenerationRequest, load_family

ENGINES = {"continuous": ContinuousEngine, "dynamic": Engine}


def greedy(max_new_tokens: int = 10, **extra) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, do_sample=False, **extra)


@pytest.fixture(scope="module")
def text(make_settings):
    adapter = load_family(make_settings().models["deepseek"], "cpu")
    yield adapter
    adapter.release()


def prompt(adapter, i: int):
    return adapter.prepare(GenerationRequest(prompt=f"tell me about the number {i} and the sea " * (1 + i % 3)))


def run_batch(adapter, engine_name: str, rows: list[tuple]) -> list:
    """All rows queued before the worker starts: they share its first batch (or prefill)."""
    engine = ENGINES[engine_name](adapter, key="deepseek", max_batch_size=16, max_queue=64, queue_timeout=60.0)
    jobs = [engine.submit(prepared, params) for prepared, params in rows]
    engine.start()
    try:
        return [job.wait() for job in jobs]
    finally:
        engine.stop()


def reference_tokens(adapter, prepared, params: GenerationParams) -> list[int]:
    """OpenAI's definition, written out here: greedy over the model's own logits (no cache: every step
    runs the whole sequence) minus frequency * count minus presence * (count > 0), plus logit_bias."""
    import torch
    ids = prepared["input_ids"][0].tolist()
    eos = adapter._eos_ids()
    out: list[int] = []
    bias = dict(params.logit_bias)
    for _ in range(params.max_new_tokens):
        with torch.inference_mode():
            logits = adapter.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float().tolist()
        for token in set(out):
            logits[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        for token, value in bias.items():
            logits[token] += value
        token = max(range(len(logits)), key=logits.__getitem__)
        out.append(token)
        if token in eos:
            break
    return out


def first_token(adapter, prepared) -> int:
    return adapter.generate(prepared, greedy(1, logprobs=0)).logprobs[0]["token_id"]


@pytest.mark.parametrize("engine_name", ENGINES)
def test_penalised_rows_follow_the_reference_and_plain_rows_their_solo_answer(text, engine_name):
    p0, p1, p2 = prompt(text, 0), prompt(text, 1), prompt(text, 2)
    solo = text.generate(p0, greedy())
    first = text.generate(p1, greedy(1)).text
    first_id = first_token(text, p1)
    penalised = [greedy(frequency_penalty=1.5), greedy(presence_penalty=2.0), greedy(frequency_penalty=-0.7,
                                                                                    presence_penalty=0.4),
                 greedy(logit_bias=((first_id, -100.0),))]
    rows = [(p0, greedy())] + [(p1, q) for q in penalised] + [(p2, greedy(presence_penalty=0.0))]
    results = run_batch(text, engine_name, rows)
    assert (results[0].text, results[0].completion_tokens) == (solo.text, solo.completion_tokens)
    assert results[-1].text == text.generate(p2, greedy()).text  # a penalty of 0 changes nothing
    for params, result in zip(penalised, results[1:-1]):
        expected = text.result_from_tokens(reference_tokens(text, p1, params), 0, "stop")
        assert result.text == expected.text, params
    assert not results[4].text.startswith(first), "a bias of -100 bans the token greedy decoding chose first"
    assert len({r.text for r in results[1:5]}) > 1, "the penalties must change the answers to test anything"


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_strong_bias_forces_its_token(text, engine_name):
    forced = text.generate(prompt(text, 3), greedy(1, logprobs=5)).logprobs[0]["top"][4]["token_id"]  # 5th likeliest
    (result,) = run_batch(text, engine_name, [(prompt(text, 3), greedy(6, logprobs=0, logit_bias=((forced, 100.0),)))])
    assert [entry["token_id"] for entry in result.logprobs] == [forced] * 6


@pytest.mark.parametrize("engine_name", ENGINES)
def test_seeded_sampling_with_min_p_is_the_same_whoever_shares_the_batch(text, engine_name):
    seeded = GenerationParams(max_new_tokens=12, temperature=1.2, top_p=1.0, do_sample=True, seed=11, min_p=0.05,
                              frequency_penalty=0.5)
    alone = run_batch(text, engine_name, [(prompt(text, 4), seeded)])[0]
    crowd = [(prompt(text, i), replace(seeded, seed=None, temperature=1.5)) for i in range(5)]
    crowded = run_batch(text, engine_name, crowd[:3] + [(prompt(text, 4), seeded)] + crowd[3:])[3]
    other_seed = run_batch(text, engine_name, [(prompt(text, 4), replace(seeded, seed=12))])[0]
    assert alone.text == crowded.text
    assert alone.text != other_seed.text


@pytest.mark.parametrize("engine_name", ENGINES)
def test_logprobs_are_the_models_own(text, engine_name):
    import torch
    p = prompt(text, 5)
    (result,) = run_batch(text, engine_name, [(p, greedy(5, logprobs=3, prompt_logprobs=2))])
    assert len(result.logprobs) == result.completion_tokens == 5
    ids = p["input_ids"][0].tolist()
    with torch.inference_mode():
        logits = text.model(input_ids=torch.tensor([ids + [e["token_id"] for e in result.logprobs]])).logits[0]
    expected = torch.log_softmax(logits.float(), -1)
    for step, entry in enumerate(result.logprobs):
        row = expected[len(ids) - 1 + step]
        assert math.isclose(entry["logprob"], float(row[entry["token_id"]]), abs_tol=1e-4)
        assert [t["token_id"] for t in entry["top"]] == row.topk(3).indices.tolist()
        assert entry["token_id"] == entry["top"][0]["token_id"]  # greedy: the most likely one
        assert entry["token"] == text._tokenizer().decode([entry["token_id"]])
    assert result.prompt_logprobs[0]["logprob"] is None and len(result.prompt_logprobs) == len(ids)
    assert result.prompt_logprobs[0]["token_id"] == ids[0]
    second = result.prompt_logprobs[1]
    assert second["token_id"] == ids[1]
    assert math.isclose(second["logprob"], float(expected[0][ids[1]]), abs_tol=1e-4)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_groups_rows_batch_together_and_equal_prompts_share_one_prefill(text, engine_name):
    p, q = prompt(text, 0), prompt(text, 1)
    solo = [text.generate(p, greedy(6)), text.generate(q, greedy(6))]
    engine = ENGINES[engine_name](text, key="deepseek", max_batch_size=16, max_queue=64, queue_timeout=60.0)
    widths = []
    hook = text.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True)
    try:
        group = engine.submit_group([(p, greedy(6))] * 3 + [(q, greedy(6, presence_penalty=0.0))])
        engine.start()
        results = engine.run_group(group)
    finally:
        hook.remove()
        engine.stop()
    assert [r.text for r in results] == [solo[0].text] * 3 + [solo[1].text]
    if engine_name == "continuous":
        assert widths[0] == 2, widths  # the three equal prompts and the other one: a prefill of two rows
    else:
        assert engine.stats()["batches"] == 1  # one generate for all four


class OnlyEvenTokens:
    """A constraint through the hook grammars use: every odd token id is masked."""

    def __init__(self) -> None:
        self.advanced: list[int] = []

    def mask(self, logits):
        logits[1::2] = float("-inf")  # in place, as a grammar's bitmask does

    def advance(self, token_id: int) -> None:
        self.advanced.append(token_id)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_constraint_from_the_hook_masks_its_row_only(text, engine_name):
    from utils.engine import sampling
    made: list[OnlyEvenTokens] = []

    def build(params, tokenizer, stop_ids):
        if params.max_new_tokens == 7:  # only the row that asks (a grammar's row would say so in its params)
            made.append(OnlyEvenTokens())
            return made[-1]
        return None

    p = prompt(text, 2)
    free = text.generate(p, greedy(6, logprobs=0))
    assert any(e["token_id"] % 2 for e in free.logprobs), "the free answer must hold odd ids to test anything"
    sampling.CONSTRAINT_BUILDERS.append(build)
    try:
        constrained, neighbour = run_batch(text, engine_name, [(p, greedy(7, logprobs=0)), (p, greedy(6))])
    finally:
        sampling.CONSTRAINT_BUILDERS.remove(build)
    ids = [e["token_id"] for e in constrained.logprobs]
    assert ids and all(i % 2 == 0 for i in ids) and made[0].advanced == ids
    assert neighbour.text == free.text
