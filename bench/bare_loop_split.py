"""The bare dynamic-batching loop in two processes, as vLLM splits its API server from its engine core:
the HTTP process (Flask + gunicorn, gthread) renders the chat template, tokenizes and detokenizes; an
engine process it starts drains a queue of token ids into one left-padded greedy `generate` and sends
the new ids back over a pipe. Otherwise bench/bare_loop.py. With BARE_SPLIT_ENGINE_KIND=ours the engine
process runs our continuous engine (utils/engine/continuous.py, compiled decode) instead, fed the same
token ids. A probe of what a second process buys on 2 cores (issue 29: vLLM's CPU build keeps two cores
busy, one process of ours one), not a server: no limits, no errors, no streaming.

    BARE_MODEL=DIR [BARE_SPLIT_ENGINE_KIND=ours] gunicorn -w 1 -k gthread --threads 32 -b 127.0.0.1:PORT \
        bench.bare_loop_split:app
"""
import itertools
import multiprocessing
import os
import threading
from pathlib import Path

from transformers import AutoTokenizer

from bench.bare_http import make_app

PATH = os.environ["BARE_MODEL"]


def engine(path: str, conn) -> None:
    """The engine process: batches of (id, ids, tokens) in, (id, new ids) out."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    while True:
        batch = [conn.recv()]
        while len(batch) < 32 and conn.poll():
            batch.append(conn.recv())
        width = max(len(ids) for _, ids, _ in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask,
                                 max_new_tokens=max(tokens for _, _, tokens in batch), do_sample=False,
                                 pad_token_id=pad)
        conn.send([(job_id, row[:tokens].tolist()) for (job_id, _, tokens), row in zip(batch, out[:, width:])])


def our_engine(path: str, conn) -> None:
    """BARE_SPLIT_ENGINE_KIND=ours: our continuous engine (compiled decode, as vs_vllm_cpu's
    ours_compiled) behind the same pipe; each row's text and token count go back. Three threads: this
    one submits, the engine's steps, one sends what finished (no thread waits per request)."""
    import queue

    import torch

    from utils.config.schema import ModelSpec
    from utils.engine.continuous import ContinuousEngine
    from utils.families import GenerationParams, load_family

    torch.set_num_threads(1)
    adapter = load_family(ModelSpec(key="probe", repo_id=None, path=Path(path), family="text", dtype="bfloat16"),
                          "cpu")
    engine = ContinuousEngine(adapter, key="probe", max_batch_size=32, max_queue=256, queue_timeout=60.0,
                              compile_decode=True).start()
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def sender() -> None:
        while True:
            job_id, job = finished.get()
            conn.send([(job_id, (job.result.text, job.result.completion_tokens))])

    threading.Thread(target=sender, daemon=True).start()
    while True:
        job_id, ids, tokens = conn.recv()
        prompt = torch.tensor([ids])
        job = engine.submit({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
                            GenerationParams(max_new_tokens=tokens, temperature=1.0, top_p=1.0, do_sample=False))
        ended, sent = job._ended, threading.Lock()

        def on_end(job=job, job_id=job_id, ended=ended, sent=sent) -> None:  # the engine's thread finishes it
            ended()
            if sent.acquire(blocking=False):
                finished.put((job_id, job))
        job._ended = on_end
        if job.done:  # it ended before the hook was in place
            on_end()


tokenizer = AutoTokenizer.from_pretrained(PATH)
IN_ENGINE = os.environ.get("BARE_SPLIT_ENGINE") == "1"  # the engine process imports this module too
if not IN_ENGINE:
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    os.environ["BARE_SPLIT_ENGINE"] = "1"  # inherited by the child
    target = our_engine if os.environ.get("BARE_SPLIT_ENGINE_KIND") == "ours" else engine
    multiprocessing.get_context("spawn").Process(target=target, args=(PATH, theirs), daemon=True).start()
    del os.environ["BARE_SPLIT_ENGINE"]
waiting: dict[int, dict] = {}
send_lock = threading.Lock()
ids = itertools.count()


def receiver() -> None:
    while True:
        for job_id, new_ids in ours.recv():
            job = waiting.pop(job_id)
            job["ids"] = new_ids
            job["done"].set()


if not IN_ENGINE:
    threading.Thread(target=receiver, daemon=True).start()


def submit(body: dict) -> list[int]:
    prompt_ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    job = {"done": threading.Event()}
    job_id = next(ids)
    waiting[job_id] = job
    with send_lock:
        ours.send((job_id, list(prompt_ids), int(body.get("max_tokens", 16))))
    job["done"].wait()
    return job["ids"]


app = make_app(tokenizer, submit)
