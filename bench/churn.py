"""Model churn: how many loads a mixed stream over five models costs with grouping off vs on.

d. 300 requests, spread evenly over the five demo models (60 each) in an order shuffled with a fixed
   seed, sent at concurrency 8 to our server (demo mode) with MAX_LOADED_MODELS=2, so most requests
   need a model that is not loaded. Run twice on fresh servers with the same sequence: GROUP_WINDOW=0
   (grouping off) and GROUP_WINDOW unset (the server's default window: a model that just served is not
   evicted for another model's load, so requests for loaded models get served first).

Loads are counted from /admin/model_status (the sum over models of load_count after the run minus
before it; a warm-up request to each model before counting is excluded). MODEL_IDLE_TIMEOUT=3600 so no
idle unloads interfere.

stdout: one JSON line per mode (requests, errors with the first few bodies, loads, loads per 100
requests, seconds, req/s) and one with the ratio of loads with vs without grouping.

    .venv/bin/python bench/churn.py [--requests 300] [--concurrency 8] [--seed 0] [--quick]
                                    [--models-dir DIR] [--server-env KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def sequence(n: int, seed: int) -> list[str]:
    """n keys, as even a split over the five as n allows, shuffled with `seed`."""
    keys = [C.DEMO_KEYS[i % len(C.DEMO_KEYS)] for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


def total_loads(server: C.Server) -> tuple[int, dict]:
    status = C.model_status(server)
    per_model = {key: int(info.get("load_count") or 0) for key, info in status.items()}
    return sum(per_model.values()), per_model


def run_mode(args, work: Path, mode: str, keys: list[str], image: str, audio: str) -> dict:
    env = {"MAX_LOADED_MODELS": "2", "MODEL_IDLE_TIMEOUT": "3600", **args.server_env}
    unset: tuple[str, ...] = ()
    if mode == "off":
        env["GROUP_WINDOW"] = "0"
    else:
        env.pop("GROUP_WINDOW", None)
        unset = ("GROUP_WINDOW",)
    server = C.start_ours(f"ours_grouping_{mode}", args.models_dir, work, env, unset=unset)
    try:
        bodies = {key: C.ours_payload(key, image, audio) for key in C.DEMO_KEYS}
        # Warm-up: every model once, in order (first load of each pays imports and processor set-up).
        for key in C.DEMO_KEYS:
            out = C.post_json(f"{server.url}/generate/{key}", bodies[key], args.request_timeout)
            if out.status != 200:
                raise RuntimeError(f"warm-up {key}: {out.status} {out.body}")
        loads_before, per_before = total_loads(server)
        result = C.run_load(lambda i: C.post_json(f"{server.url}/generate/{keys[i]}", bodies[keys[i]],
                                                  args.request_timeout),
                            len(keys), args.concurrency, args.budget)
        loads_after, per_after = total_loads(server)
        settings = {}
        try:
            settings = requests.get(server.url + "/admin/model_status", timeout=10).json().get("settings", {})
        except Exception:
            pass
    finally:
        server.stop()
    loads = loads_after - loads_before
    record = {"kind": "measurement", "bench": "d", "grouping": mode,
              "group_window": "0" if mode == "off" else "default (unset)",
              "server_group_window": settings.get("group_window"),
              "max_loaded_models": settings.get("max_loaded_models"),
              "concurrency": args.concurrency, "requests": result.requests, "ok": result.ok,
              "errors": result.errors, "error_bodies": result.error_bodies[:5], "truncated": result.truncated,
              "loads": loads, "loads_per_100": round(100 * loads / result.requests, 2) if result.requests else None,
              "loads_per_model": {k: per_after.get(k, 0) - per_before.get(k, 0) for k in per_after},
              "seconds": round(result.seconds, 2), "rps": round(result.rps, 3),
              "p50_s": result.summary()["p50_s"], "loadavg_1m": round(os.getloadavg()[0], 2)}
    C.emit(record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 requests")
    C.add_run_args(parser, budget=420, request_timeout=180,
                   server_env_help="extra environment for our servers (repeatable; GROUP_WINDOW is set by the bench)")
    parser.add_argument("--modes", default="off,on", help="which of off,on to run (default both)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 60)
    args.server_env = C.parse_env_pairs(args.server_env)
    args.server_env.pop("GROUP_WINDOW", None)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"off", "on"}:
        parser.error("--modes takes off, on")
    C.install_cleanup()
    work, cleanup_work = C.make_work_dir(args.keep_work)
    records: dict[str, dict] = {}
    failed = []
    try:
        args.models_dir = C.prepare_models_dir(args.models_dir, work)
        keys = sequence(args.requests, args.seed)
        image, audio = C.png_b64(224), C.wav_b64(1.0)
        C.emit({"kind": "meta", "bench": "d", "commit": C.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                "per_model": dict(Counter(keys)), "cpus": os.cpu_count(), "server_env": args.server_env})
        for mode in modes:
            C.log(f"churn, grouping {mode}")
            try:
                records[mode] = run_mode(args, work, mode, keys, image, audio)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                C.emit({"kind": "error", "bench": "d", "grouping": mode, "error": f"{type(exc).__name__}: {exc}"[:3000]})
                failed.append(mode)
    except KeyboardInterrupt:
        C.log("interrupted; servers stopped")
        return 130
    finally:
        C.stop_all()
        cleanup_work()
    if "off" in records and "on" in records:
        off, on = records["off"], records["on"]
        ratio = (on["loads_per_100"] / off["loads_per_100"]) if off["loads_per_100"] else None
        C.emit({"kind": "ratio", "bench": "d", "compare": "loads per 100 requests, grouping on / off",
                "loads_per_100_off": off["loads_per_100"], "loads_per_100_on": on["loads_per_100"],
                "ratio": round(ratio, 3) if ratio is not None else None,
                "rps_off": off["rps"], "rps_on": on["rps"],
                "rps_ratio": round(on["rps"] / off["rps"], 3) if off["rps"] else None,
                "errors_off": off["errors"], "errors_on": on["errors"]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
