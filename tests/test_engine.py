"""The engines on the real tiny checkpoints: batched answers equal solo answers (no drift, no
mix-ups), back-pressure, cancellation, streaming inside a batch, draining. No stand-ins: every
row runs the family's real processor and the model's real forward passes."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from utils.engine import Engine, QueueFull, QueueTimeout
from utils.engine.continuous import ContinuousEngine
from utils.errors import ModelUnavailable
from utils.families import GenerationParams, GenerationRequest, load_family

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
FAMILIES = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni")


def greedy(max_new_tokens: int = 8, **extra) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, do_sample=False, **extra)


def request_for(key: str, i: int) -> GenerationRequest:
    """The i-th of 16 different requests: prompts of different lengths, media of different sizes."""
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 255, (24 + 4 * i, 32 + 2 * i, 3), dtype=np.uint8))
    audio = (0.3 * np.sin(np.linspace(0, 150 * (i + 1), 16000 // (1 + i % 3)))).astype(np.float32)
    media = {"deepseek": {}, "qwen_vl": {"images": [image]}, "blip_vqa": {"images": [image]},
             "qwen_audio": {"audios": [audio]}, "qwen_omni": {"images": [image], "audios": [audio]}}[key]
    return GenerationRequest(prompt=" ".join(WORDS[: 1 + i % 12]) + f" number {i}", **media)


@pytest.fixture(scope="module")
def adapters(make_settings):
    settings = make_settings()
    loaded = {key: load_family(settings.models[key], "cpu") for key in FAMILIES}
    yield loaded
    for adapter in loaded.values():
        adapter.release()


def make_engine(adapter, cls=None, **overrides):
    cls = cls or (ContinuousEngine if ContinuousEngine.supports(adapter) else Engine)
    options = dict(key=adapter.spec.key, max_batch_size=16, max_queue=64, queue_timeout=60.0)
    options.update(overrides)
    return cls(adapter, **options)


def same(a, b) -> bool:
    return (a.text, a.reasoning, a.completion_tokens, a.finish_reason, a.prompt_tokens) == \
        (b.text, b.reasoning, b.completion_tokens, b.finish_reason, b.prompt_tokens)


def run_together(engine, prepared, params, *, spread: float) -> list:
    """Every request from its own thread, released at once and then `spread` seconds apart (arrivals
    over the first steps: a continuous engine takes them as joins); the results in request order."""
    results: list = [None] * len(prepared)
    barrier = threading.Barrier(len(prepared))

    def client(i: int) -> None:
        barrier.wait()
        time.sleep(spread * i)
        results[i] = engine.run(engine.submit(prepared[i], params[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prepared))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("key", FAMILIES)
def test_sixteen_concurrent_requests_each_get_their_solo_answer(adapters, key):
    adapter = adapters[key]
    prepared = [adapter.prepare(request_for(key, i)) for i in range(16)]
    params = [greedy(3 + (i * 5) % 11, repetition_penalty=1.3 if i % 5 == 0 else None) for i in range(16)]
    solo = [adapter.generate(p, q) for p, q in zip(prepared, params)]
    assert len({r.text for r in solo}) > 8, "the prompts must give different answers to catch mix-ups"
    engine = make_engine(adapter).start()
    results = run_together(engine, prepared, params, spread=0.002)
    engine.stop()
    mismatched = [i for i in range(16) if not same(solo[i], results[i])]
    assert not mismatched, [(solo[i].text, results[i].text) for i in mismatched]
    stats = engine.stats()
    assert stats["rows"] == 16 and stats["peak_batch"] > 1, f"nothing was batched: {stats}"


def test_one_batch_with_different_lengths_and_media_counts(adapters):
    """All rows queued before the worker starts: one padded generate over sixteen rows."""
    adapter = adapters["qwen_vl"]
    prepared = [adapter.prepare(request_for("qwen_vl", i)) for i in range(16)]
    params = [greedy(2 + i % 7) for i in range(16)]
    solo = [adapter.generate(p, q) for p, q in zip(prepared, params)]
    engine = make_engine(adapter)
    jobs = [engine.submit(p, q) for p, q in zip(prepared, params)]
    engine.start()
    results = [job.wait() for job in jobs]
    engine.stop()
    assert engine.stats()["batches"] == 1
    assert all(same(a, b) for a, b in zip(solo, results))


def test_continuous_rows_keep_their_own_sampling_and_seed(adapters):
    adapter = adapters["deepseek"]
    engine = make_engine(adapter).start()
    prepared = adapter.prepare(request_for("deepseek", 3))
    seeded = GenerationParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, do_sample=True, seed=7)
    alone = engine.run(engine.submit(prepared, seeded))
    neighbours = [engine.submit(adapter.prepare(request_for("deepseek", i)),
                                GenerationParams(max_new_tokens=20, temperature=1.3, top_p=1.0, do_sample=True))
                  for i in range(6)]
    crowded = engine.run(engine.submit(prepared, seeded))
    greedy_row = engine.run(engine.submit(prepared, greedy(12)))
    for job in neighbours:
        job.wait()
    engine.stop()
    assert same(alone, crowded), "a seeded request must not depend on who else is in the batch"
    assert same(greedy_row, adapter.generate(prepared, greedy(12)))


def test_a_full_queue_refuses_with_retry_after(adapters):
    adapter = adapters["deepseek"]
    engine = make_engine(adapter, max_queue=2)  # not started: nothing leaves the queue
    prepared = adapter.prepare(request_for("deepseek", 1))
    engine.submit(prepared, greedy())
    engine.submit(prepared, greedy())
    with pytest.raises(QueueFull) as refused:
        engine.submit(prepared, greedy())
    assert refused.value.status == 503 and "Retry-After" in refused.value.headers
    assert "max_queue=2" in refused.value.details
    engine.start()
    engine.stop()


def test_a_request_that_waits_past_queue_timeout_leaves_the_queue(adapters):
    adapter = adapters["blip_vqa"]
    engine = make_engine(adapter, queue_timeout=0.3)
    job = engine.submit(adapter.prepare(request_for("blip_vqa", 1)), greedy())
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as timed_out:
        engine.run(job)
    assert 0.25 < time.monotonic() - started < 5
    assert timed_out.value.status == 503 and "queue_timeout" in timed_out.value.details
    assert engine.stats()["queue_depth"] == 0
    engine.start()
    engine.stop()


def test_a_client_that_goes_away_leaves_the_queue(adapters):
    adapter = adapters["qwen_vl"]
    engine = make_engine(adapter)
    job = engine.submit(adapter.prepare(request_for("qwen_vl", 1)), greedy())
    with pytest.raises(ModelUnavailable, match="went away"):
        engine.run(job, is_gone=lambda: True)
    assert engine.stats()["queue_depth"] == 0 and job.cancelled
    engine.start()
    engine.stop()


@pytest.mark.parametrize("key", ["deepseek", "qwen_vl"])
def test_a_cancelled_row_stops_and_its_neighbours_are_untouched(adapters, key):
    adapter = adapters[key]
    engine = make_engine(adapter)
    long_job = engine.submit(adapter.prepare(request_for(key, 2)), greedy(3000))
    neighbour_prepared = adapter.prepare(request_for(key, 5))
    neighbour = engine.submit(neighbour_prepared, greedy(6))
    engine.start()
    assert long_job.wait_started(30)
    time.sleep(0.1)
    long_job.cancel()
    result = long_job.wait()
    engine.stop()
    assert result.finish_reason == "cancelled" and result.completion_tokens < 3000
    assert same(neighbour.wait(), adapter.generate(neighbour_prepared, greedy(6)))


@pytest.mark.parametrize("key", ["deepseek", "qwen_vl"])
def test_streaming_rows_inside_a_batch_get_their_own_pieces(adapters, key):
    adapter = adapters[key]
    prepared = [adapter.prepare(request_for(key, i)) for i in range(6)]

    def streamed(engine, i):
        job = engine.submit(prepared[i], greedy(10), streaming=True)
        pieces = job.pieces()
        text = ""
        while True:
            try:
                text += next(pieces)
            except StopIteration as end:
                return text, end.value

    alone = {}
    for i in (1, 4):
        engine = make_engine(adapter).start()
        alone[i] = streamed(engine, i)
        engine.stop()
    engine = make_engine(adapter)
    others = [engine.submit(prepared[i], greedy(4 + i)) for i in (0, 2, 3, 5)]
    outcomes: dict = {}
    threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(i, streamed(engine, i))) for i in (1, 4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # both streams queued with the others before the worker starts
    engine.start()
    for thread in threads:
        thread.join()
    for job in others:
        job.wait()
    engine.stop()
    for i in (1, 4):
        text, result = outcomes[i]
        assert text and text == alone[i][0], (text, alone[i][0])
        assert same(result, alone[i][1])


def test_stop_drains_queued_and_running_jobs(adapters):
    adapter = adapters["deepseek"]
    engine = make_engine(adapter, max_batch_size=2)
    jobs = [engine.submit(adapter.prepare(request_for("deepseek", i)), greedy(6)) for i in range(6)]
    engine.start()
    engine.stop()
    assert all(job.done and job.error is None and job.result.completion_tokens >= 1 for job in jobs)
    with pytest.raises(ModelUnavailable, match="unloading"):
        engine.submit(adapter.prepare(request_for("deepseek", 1)), greedy())


def test_a_row_that_breaks_its_batch_fails_alone(adapters):
    """A malformed row (image patches that do not match its grid) makes the padded call raise; the
    engine runs the rows again one by one, so only that row fails."""
    adapter = adapters["qwen_vl"]
    good = [adapter.prepare(request_for("qwen_vl", i)) for i in range(3)]
    broken = dict(adapter.prepare(request_for("qwen_vl", 4)))
    broken["pixel_values"] = broken["pixel_values"][:-4]
    engine = make_engine(adapter)
    jobs = [engine.submit(p, greedy(5)) for p in good[:2]] + [engine.submit(broken, greedy(5))] + \
        [engine.submit(good[2], greedy(5))]
    engine.start()
    for job in jobs:
        job.wait_done(60)
    engine.stop()
    assert [job.error is None for job in jobs] == [True, True, False, True]
    assert all(same(job.result, adapter.generate(p, greedy(5))) for job, p in zip(jobs[:2] + jobs[3:], good))


# ------------------------------------------------------------------ deadlines and out-of-memory

@pytest.mark.parametrize("key", ["deepseek", "qwen_vl"])
def test_a_row_past_its_deadline_stops_with_timeout_and_its_neighbours_go_on(adapters, key):
    adapter = adapters[key]
    engine = make_engine(adapter)
    slow = engine.submit(adapter.prepare(request_for(key, 2)), greedy(3000), timeout=0.3)
    neighbour_prepared = adapter.prepare(request_for(key, 5))
    neighbour = engine.submit(neighbour_prepared, greedy(6))
    started = time.monotonic()
    engine.start()
    result = slow.wait()
    assert result.finish_reason == "timeout" and 0 < result.completion_tokens < 3000
    assert time.monotonic() - started < 3
    assert same(neighbour.wait(), adapter.generate(neighbour_prepared, greedy(6)))
    after = engine.run(engine.submit(neighbour_prepared, greedy(6)))  # served at once afterwards
    engine.stop()
    assert same(after, adapter.generate(neighbour_prepared, greedy(6)))


def test_a_deadline_that_passes_in_the_queue_is_a_408(adapters):
    from utils.errors import RequestTimeout
    adapter = adapters["blip_vqa"]
    engine = make_engine(adapter)  # not started: the job never leaves the queue
    job = engine.submit(adapter.prepare(request_for("blip_vqa", 1)), greedy(), timeout=0.2)
    with pytest.raises(RequestTimeout) as timed_out:
        engine.run(job)
    assert timed_out.value.status == 408 and engine.stats()["queue_depth"] == 0
    engine.start()
    engine.stop()


class OutOfMemoryAbove:
    """A forward pre-hook on the real model: raises torch's OutOfMemoryError whenever a forward pass
    holds more than `rows` rows (what a CUDA allocator does when a batch does not fit)."""

    def __init__(self, model, rows: int) -> None:
        self.rows, self.raised = rows, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        import torch
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is not None and ids.shape[0] > self.rows:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {ids.shape[0]} rows > {self.rows})")

    def remove(self):
        self.handle.remove()


def run_queued_under_oom(adapter, prepared, params, *, rows):
    """Every request queued before the engine starts, forward passes over `rows` rows failing with
    out-of-memory: (the results, how many passes failed)."""
    oom = OutOfMemoryAbove(adapter.model, rows=rows)
    try:
        engine = make_engine(adapter)
        jobs = [engine.submit(p, params) for p in prepared]
        engine.start()
        results = [job.wait() for job in jobs]
        engine.stop()
    finally:
        oom.remove()
    return results, oom.raised


def test_dynamic_out_of_memory_retries_in_halves_and_every_row_is_answered(adapters):
    adapter = adapters["qwen_vl"]
    prepared = [adapter.prepare(request_for("qwen_vl", i)) for i in range(8)]
    solo = [adapter.generate(p, greedy(5)) for p in prepared]
    results, raised = run_queued_under_oom(adapter, prepared, greedy(5), rows=2)
    assert raised >= 2 and all(same(a, b) for a, b in zip(solo, results))


def test_out_of_memory_even_alone_is_a_503_and_the_model_serves_on(adapters):
    from utils.errors import OutOfMemory
    adapter = adapters["qwen_vl"]
    prepared = adapter.prepare(request_for("qwen_vl", 3))
    engine = make_engine(adapter).start()
    oom = OutOfMemoryAbove(adapter.model, rows=0)
    try:
        with pytest.raises(OutOfMemory) as refused:
            engine.run(engine.submit(prepared, greedy(4)))
    finally:
        oom.remove()
    assert refused.value.status == 503 and "Retry-After" in refused.value.headers
    assert same(engine.run(engine.submit(prepared, greedy(4))), adapter.generate(prepared, greedy(4)))
    engine.stop()


def test_continuous_out_of_memory_requeues_newcomers_and_lowers_the_row_limit(adapters):
    adapter = adapters["deepseek"]
    prepared = [adapter.prepare(request_for("deepseek", i)) for i in range(6)]
    solo = [adapter.generate(p, greedy(6)) for p in prepared]
    results, raised = run_queued_under_oom(adapter, prepared, greedy(6), rows=2)  # prefills of 3+ rows fail
    assert raised >= 1 and all(same(a, b) for a, b in zip(solo, results))


SYSTEM = ("You are a careful assistant for a team of engineers. Answer briefly, name the trade-offs and say "
          "what you would measure before deciding.")


def test_prefix_reuse_gives_a_fresh_prefills_tokens_on_a_multi_turn_chat(adapters):
    """Turn after turn of three chats that share a system prompt, each turn's three requests sent at
    once (so rows with cached prefixes of different lengths join together): each answer equals the
    same prompt prefilled from scratch, alone, and the cache was really used."""
    adapter = adapters["deepseek"]
    engine = make_engine(adapter, prefix_cache_bytes=64 * 2**20).start()

    def say(role, text):
        return {"role": role, "content": [{"type": "text", "text": text}]}

    chats: list[list[dict]] = [[say("system", SYSTEM)] for _ in range(3)]
    try:
        for turn in range(4):
            prepared, params = [], []
            for number, messages in enumerate(chats):
                messages.append(say("user", f"chat {number} question {turn}: " + " ".join(WORDS[turn + number:])))
                prepared.append(adapter.prepare(GenerationRequest(prompt="", messages=[dict(m) for m in messages])))
                params.append(greedy(5 + turn + number))
            fresh = [adapter.generate(p, q) for p, q in zip(prepared, params)]
            jobs = [engine.submit(p, q) for p, q in zip(prepared, params)]
            reused = [engine.run(job) for job in jobs]
            for number, messages in enumerate(chats):
                assert same(fresh[number], reused[number]), (turn, number, fresh[number].text, reused[number].text)
                messages.append(say("assistant", reused[number].text or "ok"))
        stats = engine.stats()
    finally:
        engine.stop()
    cached = stats["prefix_cache"]
    assert cached["hits"] >= 9 and cached["tokens_reused"] > 16 * cached["hits"] / 2, cached
    assert 0 < cached["bytes"] <= cached["max_bytes"]
    assert cached["superseded"] >= 6 and cached["entries"] <= 4, cached  # a turn replaces the chat's last
    assert stats["peak_batch"] > 1, "the turns' requests never joined together"


def test_prefix_cache_drops_the_least_recently_used_past_its_bytes():
    import torch

    from utils.engine.prefix_cache import BLOCK, PrefixCache

    def kv(tokens):  # one layer, [1, heads, tokens, head_dim] of float32: 4 * 2 * 8 bytes per token and tensor
        return [(torch.zeros(1, 2, len(tokens), 8), torch.zeros(1, 2, len(tokens), 8))]

    per_token = 2 * 2 * 8 * 4
    prompts = [[n] * (2 * BLOCK) for n in range(3)]
    cache = PrefixCache(max_bytes=2 * 2 * BLOCK * per_token)  # room for two prompts
    for prompt in prompts[:2]:
        cache.add(prompt, kv(prompt))
    assert cache.lookup(prompts[0] + [7])[0] == 2 * BLOCK   # prompt 0 is now the most recently used
    cache.add(prompts[2], kv(prompts[2]))                    # so prompt 1 goes
    assert cache.lookup(prompts[1] + [7]) == (0, None)
    assert cache.lookup(prompts[2] + [7])[0] == 2 * BLOCK
    assert cache.lookup(prompts[0][:BLOCK + 3])[0] == BLOCK  # a block-aligned prefix of a cached prompt
    assert cache.lookup(prompts[0])[0] == BLOCK             # a whole cached prompt keeps one token to prefill
    assert cache.stats()["evictions"] == 1 and cache.bytes <= cache.max_bytes
    cache.clear()
    assert cache.bytes == 0 and cache.lookup(prompts[0] + [7]) == (0, None)


def test_a_prompt_that_extends_a_cached_one_replaces_it_and_matches_all_it_did():
    """A chat's next turn starts with the whole previous prompt: the cache keeps the longer one only,
    which answers every lookup the shorter one did; prompts that only share a prefix both stay."""
    import torch

    from utils.engine.prefix_cache import BLOCK, PrefixCache

    def kv(tokens):
        return [(torch.zeros(1, 2, len(tokens), 8), torch.zeros(1, 2, len(tokens), 8))]

    system = list(range(BLOCK + 5))
    turn1 = system + [100] * (BLOCK + 2)
    turn2 = turn1 + [200] * (2 * BLOCK)
    other = system + [300] * (2 * BLOCK)          # another chat: shares the system prompt only
    cache = PrefixCache(max_bytes=1 << 30)
    for prompt in (turn1, other, turn2):
        cache.add(prompt, kv(prompt))
    stats = cache.stats()
    assert (stats["entries"], stats["superseded"], stats["evictions"]) == (2, 1, 0), stats
    assert cache.bytes == sum(len(p) for p in (turn2, other)) * 2 * 2 * 8 * 4
    aligned = len(turn1) // BLOCK * BLOCK
    assert cache.lookup(turn1 + [9])[0] == aligned     # what turn 1's entry answered, turn 2's answers
    reused, entry = cache.lookup(turn2 + [9])
    assert reused == len(turn2) // BLOCK * BLOCK and entry.tokens == tuple(turn2)
    assert cache.lookup(other + [9])[1].tokens == tuple(other)
    cache.add(system, kv(system))                   # shorter than what is held: kept beside it
    assert cache.stats()["entries"] == 3


def test_a_visit_is_busy_but_while_it_waits_on_an_engine():
    from utils.engine.arrivals import Arrivals

    tally = Arrivals()
    assert tally.current() is None and tally.busy() == 0
    with tally.visit() as visit:
        assert tally.busy() == 1 and tally.current() is visit
        with tally.visit() as inner:  # the WSGI middleware inside gunicorn's worker: the same visit
            assert inner is visit and tally.busy() == 1
        assert tally.busy() == 1
        visit.wait_on_engine()
        visit.wait_on_engine()
        assert tally.busy() == 0 and tally.wait_quiet(0)
        visit.wake()
        visit.wake()
        assert tally.busy() == 1 and not tally.wait_quiet(0.01)
    assert tally.busy() == 0 and tally.current() is None
    visit.wake()  # a job that ends after its request has gone counts nothing
    assert tally.busy() == 0
    with tally.visit() as visit:
        visit.leave()  # a GET: it will not reach an engine
        visit.wake()
        assert tally.busy() == 0 and tally.current() is visit
    assert tally.busy() == 0

    entered, leave = threading.Event(), threading.Event()

    def request():
        with tally.visit() as other:
            entered.set()
            leave.wait(5)
            other.wait_on_engine()
            time.sleep(30)  # waits on its engine: not busy
    threading.Thread(target=request, daemon=True).start()
    entered.wait(5)
    assert tally.busy() == 1
    threading.Timer(0.1, leave.set).start()
    started = time.monotonic()
    assert tally.wait_quiet(5) and time.monotonic() - started < 4


def test_submit_marks_the_request_waiting_and_its_end_wakes_it(adapters):
    from utils.engine.arrivals import ARRIVALS

    adapter = adapters["deepseek"]
    engine = make_engine(adapter).start()
    try:
        prepared = adapter.prepare(request_for("deepseek", 1))
        with ARRIVALS.visit() as visit:
            job = engine.submit(prepared, greedy(4))
            assert job.visit is visit
            job.wait()
            assert visit.busy  # woken to write the answer
            streamed = engine.submit(prepared, greedy(4), streaming=True)
            assert "".join(streamed.pieces()) == job.result.text
            group = engine.submit_group([(prepared, greedy(4))] * 2)
            assert not visit.busy
            assert engine.run_group(group)[1].text == job.result.text and visit.busy
        assert not visit.busy and engine.submit(prepared, greedy(2)).visit is None
    finally:
        engine.stop()


def test_a_compiled_decode_step_answers_as_eager_and_compiles_only_at_its_warm_up(adapters):
    """engine.compile on the continuous engine: the warm-up compiles the decode step for one row and
    for several; then rows joining, leaving (the cache trimmed) and prefilling from reused prefixes
    run on those graphs, without one more compile, and answer as the eager engine does."""
    import torch._dynamo.utils

    adapter = adapters["deepseek"]
    prepared = [adapter.prepare(request_for("deepseek", i)) for i in range(12)]
    params = [greedy(3 + (i * 5) % 11) for i in range(12)]
    solo = [adapter.generate(p, q) for p, q in zip(prepared, params)]
    engine = make_engine(adapter, compile_decode=True, prefix_cache_bytes=1 << 20)
    stats = engine.stats()
    assert stats["decode"] == "compiled" and stats["compile_seconds"] > 0, stats
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.start()
    results = run_together(engine, prepared, params, spread=0.003)
    again = engine.run(engine.submit(prepared[3], params[3]))  # one row alone, its prompt's KV reused
    engine.stop()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a request shape recompiled"
    mismatched = [i for i in range(12) if not same(solo[i], results[i])]
    assert not mismatched, [(solo[i].text, results[i].text) for i in mismatched]
    assert same(again, solo[3]) and engine.stats()["peak_batch"] > 1


def test_the_loader_compiles_what_engine_compile_asks_of_the_continuous_engine(make_settings):
    """models.yaml's engine.compile (no static_cache) reaches the continuous engine through the
    manager's loader: the model is served compiled, and its status says so. With static_cache, compile is
    generate's, which transformers runs on CUDA only: on a CPU that load is refused with the reason."""
    import dataclasses

    from utils.engine import make_loader

    settings = make_settings()
    spec = settings.models["deepseek"]
    compiled = dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, compile=True))
    served = make_loader(load_family)(compiled, "cpu")
    try:
        assert served.status()["decode"] == "compiled"
        answer = served.engine.run(served.engine.submit(served.adapter.prepare(request_for("deepseek", 2)), greedy(4)))
        assert answer.completion_tokens == 4
    finally:
        served.release()
    dynamic = dataclasses.replace(compiled, engine=dataclasses.replace(compiled.engine, batching="dynamic",
                                                                      static_cache=True))
    with pytest.raises(ValueError, match="CUDA only"):  # static_cache + compile: generate's, on CUDA
        make_loader(load_family)(dynamic, "cpu")
