"""What per-row sampling costs (utils/engine/sampling.py), side by side in one run, in one process.

On the demo text checkpoint, 8 rows queued together, each engine (continuous; dynamic = one padded
generate with ForcedChoice): tokens/s of plain greedy rows vs rows with frequency/presence penalties
and logit_bias, with logprobs (top 5), seeded sampling with top_p and min_p, and a mix (half plain).
Prints each mode's ratio to plain greedy on the same engine. Then n=8 choices of one long prompt
(the continuous engine prefills it once) vs 8 different prompts of the same length (8 prefills).

    python bench/sampling.py [--rounds 3] [--tokens 32] [--threads 2] [--models-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.hub.demo_models import build_demo_models  # noqa: E402
from utils.engine import Engine  # noqa: E402
from utils.engine.continuous import ContinuousEngine  # noqa: E402
from utils.families import GenerationParams, GenerationRequest, load_family  # noqa: E402
from utils.config.settings import load_settings  # noqa: E402


def greedy(tokens: int, **extra) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=1.0, top_p=1.0, do_sample=False, **extra)


def modes(tokens: int) -> dict[str, list[GenerationParams]]:
    penalised = greedy(tokens, frequency_penalty=0.5, presence_penalty=0.5, logit_bias=((5, 2.0), (9, -3.0), (40, 1.0)))
    sampled = GenerationParams(max_new_tokens=tokens, temperature=0.9, top_p=0.9, do_sample=True, seed=3, min_p=0.05)
    return {"plain greedy": [greedy(tokens)] * 8, "penalties+bias": [penalised] * 8,
            "logprobs top5": [greedy(tokens, logprobs=5)] * 8, "seeded top_p+min_p": [sampled] * 8,
            "mixed (4 plain + 4 penalised)": [greedy(tokens)] * 4 + [penalised] * 4}


def timed(engine_class, adapter, rows) -> tuple[float, int]:
    engine = engine_class(adapter, key="deepseek", max_batch_size=16, max_queue=64, queue_timeout=600.0)
    group = engine.submit_group(rows)
    began = time.perf_counter()
    engine.start()
    results = engine.run_group(group)
    seconds = time.perf_counter() - began
    engine.stop()
    return seconds, sum(r.completion_tokens for r in results)


def best(engine_class, adapter, rows, rounds: int) -> float:
    """Tokens per second, best of `rounds`."""
    return max(tokens / seconds for seconds, tokens in (timed(engine_class, adapter, rows) for _ in range(rounds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    root = args.models_dir or Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    build_demo_models(root / "demo", ["deepseek"])
    settings = load_settings(env={"MODELS_DIR": str(root), "DEMO_MODE": "1", "RAM_HEADROOM_GB": "0",
                                  "TMP_DIR": str(root / "tmp"), "LOG_DIR": str(root / "logs"),
                                  "JOBS_DIR": str(root / "jobs")})
    adapter = load_family(settings.models["deepseek"], "cpu")
    prepared = [adapter.prepare(GenerationRequest(prompt=f"request {i} asks about the sea and the rain"))
                for i in range(8)]
    records = []
    for engine_name, engine_class in (("continuous", ContinuousEngine), ("dynamic", Engine)):
        best(engine_class, adapter, list(zip(prepared, [greedy(4)] * 8)), 1)  # warm-up
        base = None
        for mode, params in modes(args.tokens).items():
            rate = best(engine_class, adapter, list(zip(prepared, params)), args.rounds)
            base = base or rate
            records.append({"engine": engine_name, "mode": mode, "tokens_per_s": round(rate, 1),
                            "ratio_to_plain": round(rate / base, 3)})
            print(f"{engine_name:10s} {mode:32s} {rate:8.1f} tok/s  {rate / base:5.2f}x plain", flush=True)
    words = "the old lighthouse keeper walked along the shore in the rain ".split() * 12
    long_prompts = [adapter.prepare(GenerationRequest(prompt=" ".join([f"w{i}"] + words), raw=True)) for i in range(8)]
    shared = [(long_prompts[0], greedy(4))] * 8
    distinct = [(p, greedy(4)) for p in long_prompts]
    one = best(ContinuousEngine, adapter, shared, args.rounds)
    eight = best(ContinuousEngine, adapter, distinct, args.rounds)
    prompt_tokens = int(long_prompts[0]["input_ids"].shape[1])
    records.append({"engine": "continuous", "mode": f"n=8 of one {prompt_tokens}-token prompt vs 8 prompts",
                    "shared_tokens_per_s": round(one, 1), "distinct_tokens_per_s": round(eight, 1),
                    "ratio": round(one / eight, 3)})
    print(f"continuous n=8 of one {prompt_tokens}-token prompt {one:8.1f} tok/s vs 8 different prompts "
          f"{eight:8.1f} tok/s: {one / eight:5.2f}x", flush=True)
    adapter.release()
    print(json.dumps({"bench": "sampling", "threads": args.threads, "tokens": args.tokens, "records": records}))


if __name__ == "__main__":
    main()
