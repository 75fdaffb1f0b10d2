"""Concurrent requests: the reference server's way vs ours, side by side in one run, on this CPU.

The reference server loads the model, generates and unloads it again for EVERY request, under one
global lock. Ours leases a model the manager loaded once and runs requests on it concurrently.
Both sides use the same real loader (TextFamily on a random-weight Qwen3 checkpoint) and the same
generation call; only the policy differs.

    python bench/concurrency.py [--requests 8] [--hidden 1024 --layers 6]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_memory import build_checkpoint, make_settings, spec_for  # noqa: E402
from utils.hub.demo_models import build_demo_models  # noqa: E402
from utils.families import load_family  # noqa: E402
from utils.families.base import GenerationParams, GenerationRequest  # noqa: E402
from utils.serving.memory import MemoryProbe, estimate_model_bytes  # noqa: E402
from utils.serving.memory import release_cached_memory  # noqa: E402
from utils.serving.manager import ModelManager  # noqa: E402

PARAMS = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=1.0, do_sample=False)


def one_generation(model, i: int) -> int:
    prepared = model.prepare(GenerationRequest(prompt=f"request number {i} about the sea"))
    return model.generate(prepared, PARAMS).completion_tokens


def reference_style(spec, n: int) -> float:
    device = spec.device
    lock = threading.Lock()

    def handle(i):
        with lock:  # the reference: one global lock, load + generate + unload per request
            model = load_family(spec, device)
            try:
                return one_generation(model, i)
            finally:
                model.release()
                release_cached_memory()

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(handle, range(n)))
    return time.perf_counter() - started


def managed(spec, n: int, work: Path) -> tuple[float, int]:
    manager = ModelManager(make_settings({spec.key: spec}, None, work), load_family, estimator=estimate_model_bytes,
                           probe=MemoryProbe())

    def handle(i):
        with manager.lease(spec.key) as model:
            return one_generation(model, i)

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(handle, range(n)))
    elapsed = time.perf_counter() - started
    loads = manager.snapshot_one(spec.key)["load_count"]
    manager.shutdown()
    return elapsed, loads


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_concurrency"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    demo = build_demo_models(args.work / "demo", ["deepseek"])
    path = args.work / f"qwen3-h{args.hidden}-l{args.layers}"
    build_checkpoint(path, demo["deepseek"], args.hidden, args.layers, args.intermediate)
    spec = spec_for("bench", path, "none", args.device)
    spec = type(spec)(**{**spec.__dict__, "dtype": args.dtype})
    load_family(spec, args.device).release()  # warm the file cache for both sides alike

    ref = reference_style(spec, args.requests)
    ours, loads = managed(spec, args.requests, args.work)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"device {args.device}, {args.dtype}, checkpoint {size / 2**20:.0f} MiB, {args.requests} concurrent requests, 16 new tokens each")
    print(f"reference (load+unload per request, global lock): {ref:.2f} s")
    print(f"model manager (loaded once: {loads} load, leases):  {ours:.2f} s")
    print(f"speedup: {ref / ours:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
