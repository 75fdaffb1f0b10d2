"""backend ray on the CPU: throughput with 1 vs 2 replicas on the same load, and the cost of the Ray
hop against the local backend at c=1.

Each server is `main.py --demo` (gunicorn, one worker) with one torch thread per replica; the load
alternates two demo models (deepseek, qwen_vl), greedy, --tokens new tokens, --concurrency clients.
Replicas hold up to 2 models each, so one replica serves both models and two replicas split them:
the same work either way. Prints one JSON line per measurement and a summary line:
  {"kind": "summary", "rps_1_replica", "rps_2_replicas", "scale", "hop_ms_c1", ...}

  python bench/ray_scale.py                      # ~2-3 minutes on 2 cores
  python bench/ray_scale.py --requests 64 --quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

MODELS = ("deepseek", "qwen_vl")


def measure(server: C.Server, label: str, requests: int, concurrency: int, tokens: int, runs: int,
            budget: float, timeout: float) -> dict:
    def send(i: int) -> C.Outcome:
        body = {"prompt": C.PROMPT, "max_new_tokens": tokens, "temperature": 0}
        return C.post_json(f"{server.url}/generate/{MODELS[i % 2]}", body, timeout)

    C.run_load(send, 4 * len(MODELS), min(concurrency, 4), budget)  # warm: both models loaded
    best, rps_runs = None, []
    for _ in range(runs):
        result = C.run_load(send, requests, concurrency, budget)
        rps_runs.append(round(result.rps, 3))
        if best is None or result.rps > best.rps:
            best = result
    record = {"kind": "measurement", "label": label, "c": concurrency, "tokens": tokens, **best.summary(),
              "rps_runs": rps_runs, "loadavg_1m": round(os.getloadavg()[0], 2)}
    C.emit(record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="requests per measurement (default 128)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--runs", type=int, default=2, help="runs per measurement, best kept")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 requests, 1 run")
    C.add_run_args(parser, budget=120, request_timeout=120, server_env_help="extra server environment")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.runs = 32, 1
    C.install_cleanup()
    work, cleanup = C.make_work_dir(args.keep_work)
    try:
        models_dir = C.prepare_models_dir(args.models_dir, work)
        extra = C.parse_env_pairs(args.server_env)
        C.emit({"kind": "meta", "bench": "ray_scale", "commit": C.git_commit(), "date": time.strftime("%F %T"),
                "cpus": len(os.sched_getaffinity(0)), "requests": args.requests, "c": args.concurrency,
                "tokens": args.tokens, "runs": args.runs, "models": MODELS, "server_env": extra})
        common = {"TORCH_THREADS": "1", "MAX_LOADED_MODELS": "2", "MODEL_IDLE_TIMEOUT": "-1", **extra}
        ray = {"MODEL_SERVER_BACKEND": "ray", "RAY_REPLICA_NUM_CPUS": "0.5", "RAY_NUM_CPUS": "2",
               "RAY_MAX_MODELS_PER_REPLICA": "2"}
        out: dict = {}
        for label, env in (("local", {}), ("ray_1_replica", {**ray, "RAY_REPLICAS": "1"}),
                           ("ray_2_replicas", {**ray, "RAY_REPLICAS": "2"})):
            server = C.start_ours(label, models_dir, work, {**common, **env})
            try:
                out[label, 1] = measure(server, label, max(32, args.requests // 4), 1, 16, args.runs, args.budget,
                                        args.request_timeout)
                if label != "local":
                    out[label, "c"] = measure(server, label, args.requests, args.concurrency, args.tokens,
                                              args.runs, args.budget, args.request_timeout)
            finally:
                server.stop()
        one, two = out["ray_1_replica", "c"]["rps"], out["ray_2_replicas", "c"]["rps"]
        C.emit({"kind": "summary", "c": args.concurrency, "tokens": args.tokens,
                "rps_1_replica": one, "rps_2_replicas": two, "scale": round(two / one, 2) if one else None,
                "p50_ms_c1_local": round(out["local", 1]["p50_s"] * 1000, 1),
                "p50_ms_c1_ray": round(out["ray_1_replica", 1]["p50_s"] * 1000, 1),
                "hop_ms_c1": round((out["ray_1_replica", 1]["p50_s"] - out["local", 1]["p50_s"]) * 1000, 1),
                "rps_c1_local": out["local", 1]["rps"], "rps_c1_ray": out["ray_1_replica", 1]["rps"]})
    finally:
        C.stop_all()
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
