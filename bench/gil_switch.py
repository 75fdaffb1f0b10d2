"""What the GIL's switch interval costs the engine thread (issue 29: server.gil_switch_interval's default).

One thread times decode steps of the vs_vllm_cpu checkpoint (a 2-layer Qwen3, head_dim 64, bf16, eager,
16 rows against a 64-token cache), first alone, then beside --busy threads that run pure Python (what a
request thread does while it parses JSON, renders a chat template or tokenizes), for each switch interval.
torch gives the GIL up around each operator, so a step takes it back hundreds of times; each time a busy
thread may hold it for a whole interval. One JSON line per interval: the median step alone and beside the
busy threads, in ms, and how far the busy threads got (Python work done meanwhile, per second).

    flock /tmp/heavy.lock .venv/bin/python bench/gil_switch.py [--intervals 0.005,0.001,0.0005,0.0002,0.0001]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common as C  # noqa: E402
from bench.vs_vllm_cpu import KEY, build_checkpoint  # noqa: E402


def decode_step(model, rows: int, context: int):
    """A closure running one decode step of `rows` rows against a `context`-token cache."""
    import torch
    from transformers import DynamicCache

    from utils.engine.continuous import cache_argument

    ids = torch.randint(0, model.config.vocab_size, (rows, context))
    cache, step_ids, name = DynamicCache(), ids[:, -1:], cache_argument(model)  # the engine's own call
    with torch.inference_mode():
        model(ids, use_cache=True, **{name: cache})

    def step():
        with torch.inference_mode():
            model(step_ids, use_cache=True, **{name: cache})
            cache.crop(-1)  # back to the same cache length every step
    return step


def median_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def beside_busy(step, steps: int, busy: int) -> tuple[float, float]:
    """(median step ms, busy threads' loop iterations per second) with `busy` threads spinning."""
    stop, counts = threading.Event(), [0] * busy

    def spin(i):
        while not stop.is_set():
            sum(range(50))  # a few us of bytecode per iteration
            counts[i] += 1
    threads = [threading.Thread(target=spin, args=(i,), daemon=True) for i in range(busy)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        ms = median_ms(step, steps)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return ms, sum(counts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "models" / ".bench-vllm")
    parser.add_argument("--intervals", default="0.005,0.001,0.0005,0.0002,0.0001")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--busy", type=int, default=4)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from utils.local_services import set_torch_threads

    set_torch_threads(None)  # as the server sizes it
    checkpoint = args.work / KEY
    build_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    step = decode_step(model, args.rows, 64)
    median_ms(step, 5)  # warm
    C.emit({"kind": "meta", "bench": "gil_switch", "commit": C.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rows": args.rows, "busy_threads": args.busy, "torch_threads": torch.get_num_threads()})
    python_default = sys.getswitchinterval()
    try:
        for interval in (float(x) for x in args.intervals.split(",")):
            sys.setswitchinterval(interval)
            alone = median_ms(step, args.steps)
            busy_ms, spins = beside_busy(step, args.steps, args.busy)
            C.emit({"kind": "measurement", "bench": "gil_switch", "switch_interval_s": interval,
                    "step_ms_alone": round(alone, 2), "step_ms_beside_busy": round(busy_ms, 2),
                    "slowdown": round(busy_ms / alone, 1), "busy_spins_per_s": round(spins)})
    finally:
        sys.setswitchinterval(python_default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
