"""The operator profiler: torch.profiler on the engine threads for a few seconds, as a Chrome trace
(gzip JSON; Perfetto and chrome://tracing load it) with the forward passes' operators and the
engine's own phases (utils/engine/phases.py) as named ranges.

One profile at a time (torch has one profiler per process): a second one while one records is a
409. torch.profiler records the thread that starts it only, unless `profile_all_threads` is set;
with it set, every thread's operators are recorded and the trace keeps the engine threads' events
(those of one model, or of every loaded model), so a request thread's tokenizer calls or this route's
own sleep do not clutter it."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import threading
import time
from typing import Callable, Iterable

from utils.errors import ProfilerBusy

# Engine phases, in the order they nest: what bench/throughput.py --profile sums.
PHASES = ("engine.join", "engine.prefill", "engine.merge", "engine.step", "engine.forward", "engine.sample",
          "engine.emit", "engine.collect", "engine.generate_batch")


_ONE_AT_A_TIME = threading.Lock()  # per process: torch has one profiler per process, whatever the apps


def record_profile(seconds: float, engine_threads: Callable[[], dict[int, str]]) -> bytes:
    """Blocks for `seconds`; returns the gzip-compressed Chrome trace. `engine_threads` says which
    threads to keep: {native thread id: name}, read at the start and at the end (an engine that
    started meanwhile counts too)."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        raise ProfilerBusy("a profile is recording now; one at a time")
    try:
        threads = dict(engine_threads())
        trace = _record(seconds)
        threads.update(engine_threads())
        return gzip.compress(json.dumps(keep_threads(trace, threads)).encode(), compresslevel=5)
    finally:
        _ONE_AT_A_TIME.release()


def _record(seconds: float) -> dict:
    import torch  # deferred: torch (only when an operator asks for a profile)
    from torch.profiler import ProfilerActivity, profile  # deferred: torch

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=activities, experimental_config=config) as recording:
        time.sleep(seconds)
    handle, path = tempfile.mkstemp(suffix=".json", prefix="profile-")
    os.close(handle)
    try:
        recording.export_chrome_trace(path)
        with open(path) as file:
            return json.load(file)
    finally:
        os.unlink(path)


def keep_threads(trace: dict, threads: dict[int, str]) -> dict:
    """The trace with the CPU events of `threads` only (device events and process metadata stay),
    each engine thread named after its model."""
    pid = os.getpid()
    kept = []
    for event in trace.get("traceEvents", []):
        on_cpu = event.get("pid") == pid
        tid = event.get("tid")
        if on_cpu and tid not in threads and tid != 0:
            continue
        if on_cpu and event.get("ph") == "M" and event.get("name") == "thread_name" and tid in threads:
            event = {**event, "args": {"name": threads[tid]}}
        kept.append(event)
    return {**trace, "traceEvents": kept}


def phase_totals(events: Iterable[dict], names: Iterable[str] = PHASES) -> dict[str, dict]:
    """Seconds and count of each named range in a trace's events (complete events, "ph": "X")."""
    wanted = set(names)
    totals: dict[str, dict] = {}
    for event in events:
        if event.get("ph") == "X" and event.get("name") in wanted:
            entry = totals.setdefault(event["name"], {"seconds": 0.0, "count": 0})
            entry["seconds"] += event.get("dur", 0) / 1e6
            entry["count"] += 1
    return totals
