"""The bare dynamic-batching loop: the floor our engine should beat (issue 29). One thread drains a
queue into one left-padded greedy `generate`; Flask + gunicorn (gthread) answer /v1/chat/completions.
No limits, no streaming, no model manager: what a few dozen lines give.

    BARE_MODEL=DIR gunicorn -w 1 -k gthread --threads 32 -b 127.0.0.1:PORT bench.bare_loop:app
"""
import os
import queue
import threading

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.bare_http import make_app

torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
PATH = os.environ["BARE_MODEL"]
tokenizer = AutoTokenizer.from_pretrained(PATH, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
jobs: queue.Queue = queue.Queue()


def worker() -> None:
    while True:
        batch = [jobs.get()]
        while len(batch) < 32:
            try:
                batch.append(jobs.get_nowait())
            except queue.Empty:
                break
        inputs = tokenizer([job["prompt"] for job in batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max(job["tokens"] for job in batch), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for job, row in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
            job["ids"] = row[:job["tokens"]].tolist()
            job["done"].set()


threading.Thread(target=worker, daemon=True).start()


def submit(body: dict) -> list[int]:
    prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    job = {"prompt": prompt, "tokens": int(body.get("max_tokens", 16)), "done": threading.Event()}
    jobs.put(job)
    job["done"].wait()
    return job["ids"]


app = make_app(tokenizer, submit)
