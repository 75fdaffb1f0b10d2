"""Requests per second of our server vs `transformers serve`, and of our batching engine on vs off.

Starts everything itself on free loopback ports (our server in demo mode, the peer on the same local
demo checkpoint, offline), warms each side, then sends N identical requests ("Explain quantum computing
in simple terms", 16 new tokens, greedy) at concurrency c and keeps the best req/s of --runs runs. The
two sides of a ratio are measured alternately in the same run (A, B, A, B, ...).

  a. deepseek (Qwen3 text): ours vs `transformers serve --continuous-batching`, c = 1, 8, 32
     (targets: >= 0.95x at c=1, >= 1.2x at c=8 and c=32)
  b. qwen_vl + one 224x224 PNG per request: ours vs `transformers serve` on the same checkpoint, c = 8
     (target >= 2.5x; the peer's continuous batching takes text-only models, a VLM falls back to
     sequential generate(), so the peer runs without --continuous-batching here)
  c. every family: ours at c=8 vs ours at c=1 (targets >= 2x deepseek, >= 1.5x others), and ours at c=8
     with batching on (default MAX_BATCH_SIZE) vs a second server of ours with MAX_BATCH_SIZE=1

stdout: one JSON line per measurement ("kind": "measurement") and per ratio ("kind": "ratio"), then a
summary. Progress goes to stderr.

    .venv/bin/python bench/throughput.py [--only a,b,c] [--requests 64] [--runs 2] [--quick]
                                         [--models-dir DIR] [--server-env KEY=VALUE ...]

Needs `transformers[serving]` in the venv (fastapi, uvicorn, openai) for the peer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

TARGETS_A = {1: 0.95, 8: 1.2, 32: 1.2}
TARGET_B = 2.5
TARGET_C_SCALING = {"deepseek": 2.0}  # others: 1.5
TARGET_C_SCALING_DEFAULT = 1.5


class Bench:
    def __init__(self, args):
        self.args = args
        self.image = C.png_b64(224)
        self.audio = C.wav_b64(1.0)
        self.results: list[dict] = []
        self.failed: list[str] = []

    # --- senders ---------------------------------------------------------------------------------

    def ours_sender(self, server: C.Server, key: str):
        url = f"{server.url}/generate/{key}"
        body = C.ours_payload(key, self.image, self.audio)
        timeout = self.args.request_timeout
        return lambda i: C.post_json(url, body, timeout)

    def peer_sender(self, server: C.Server, image: bool):
        url = f"{server.url}/v1/chat/completions"
        body = C.peer_payload(self.image if image else None)
        timeout = self.args.request_timeout
        return lambda i: C.post_json(url, body, timeout)

    # --- measuring -------------------------------------------------------------------------------

    def warm(self, label: str, send, c: int) -> None:
        """One request (the peer's first one compiles/initialises: ~15 s), then a round at concurrency c."""
        started = time.monotonic()
        first = send(-1)
        if first.status != 200:
            raise RuntimeError(f"warm-up of {label} failed: {first.status} {first.body}")
        C.run_load(send, max(2 * c, 4), c, self.args.budget)
        C.log(f"warmed {label} at c={c} ({time.monotonic() - started:.1f} s)")

    def side_by_side(self, cases: list[tuple[str, object, int]], bench: str, model: str, extra: dict) -> dict:
        """cases = [(side, send, c)]; runs them in turn --runs times; best req/s per side."""
        load_before = round(os.getloadavg()[0], 2)
        best: dict[str, C.LoadResult] = {}
        all_rps: dict[str, list] = {side: [] for side, _, _ in cases}
        for _ in range(self.args.runs):
            for side, send, c in cases:
                result = C.run_load(send, self.args.requests, c, self.args.budget)
                all_rps[side].append(round(result.rps, 3))
                if side not in best or result.rps > best[side].rps:
                    best[side] = result
        for side, _, c in cases:
            record = {"kind": "measurement", "bench": bench, "model": model, "side": side, "c": c,
                      **extra.get(side, {}), **best[side].summary(), "rps_runs": all_rps[side],
                      "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)]}
            C.emit(record)
            self.results.append(record)
        return {side: best[side] for side, _, _ in cases}

    def ratio(self, bench: str, model: str, c, num: str, den: str, best: dict, target: float | None,
              **extra) -> None:
        a, b = best[num], best[den]
        value = a.rps / b.rps if b.rps > 0 else None
        usable = a.errors == 0 and b.errors == 0 and not a.truncated and not b.truncated
        record = {"kind": "ratio", "bench": bench, "model": model, "c": c, "compare": f"{num} / {den}",
                  f"{num}_rps": round(a.rps, 3), f"{den}_rps": round(b.rps, 3),
                  "ratio": round(value, 3) if value is not None else None, "target": target,
                  "met": (value is not None and value >= target and usable) if target is not None else None,
                  "clean": usable, **extra}
        C.emit(record)
        self.results.append(record)

    def engine_info(self, server: C.Server, key: str) -> dict:
        try:
            info = C.model_status(server).get(key, {})
        except Exception as exc:  # the figure still counts; only the label is missing
            return {"engine_error": str(exc)[:200]}
        return {"engine": info.get("engine"), "load_count": info.get("load_count")}

    # --- the benches -----------------------------------------------------------------------------

    def bench_a(self, ours: C.Server) -> None:
        peer = C.start_peer("peer_cb_deepseek", self.args.models_dir / "demo" / "deepseek", self.work, True)
        try:
            ours_send, peer_send = self.ours_sender(ours, "deepseek"), self.peer_sender(peer, False)
            for c in (1, 8, 32):
                self.warm("ours deepseek", ours_send, c)
                self.warm("peer deepseek (CB)", peer_send, c)
                extra = {"ours": self.engine_info(ours, "deepseek"),
                         "peer": {"peer": "transformers serve --continuous-batching"}}
                best = self.side_by_side([("ours", ours_send, c), ("peer", peer_send, c)], "a", "deepseek", extra)
                self.ratio("a", "deepseek", c, "ours", "peer", best, TARGETS_A[c],
                           peer_cb_used=C.peer_cb_used(peer))
        finally:
            peer.stop()

    def bench_b(self, ours: C.Server) -> None:
        peer = C.start_peer("peer_qwen_vl", self.args.models_dir / "demo" / "qwen_vl", self.work,
                            self.args.peer_vl_cb)
        try:
            c = 8
            ours_send, peer_send = self.ours_sender(ours, "qwen_vl"), self.peer_sender(peer, True)
            self.warm("ours qwen_vl", ours_send, c)
            self.warm("peer qwen_vl", peer_send, c)
            extra = {"ours": self.engine_info(ours, "qwen_vl"),
                     "peer": {"peer": "transformers serve" + (" --continuous-batching" if self.args.peer_vl_cb
                                                              else "")}}
            best = self.side_by_side([("ours", ours_send, c), ("peer", peer_send, c)], "b", "qwen_vl+image", extra)
            self.ratio("b", "qwen_vl+image", c, "ours", "peer", best, TARGET_B, peer_cb_used=C.peer_cb_used(peer))
        finally:
            peer.stop()

    def bench_c(self, ours: C.Server) -> None:
        off = C.start_ours("ours_batch_off", self.args.models_dir, self.work,
                           {**self.ours_env, "MAX_BATCH_SIZE": "1"})
        try:
            for key in C.DEMO_KEYS:
                label = key + "".join(f"+{m}" for m in C.MEDIA_BY_KEY[key])
                on_send, off_send = self.ours_sender(ours, key), self.ours_sender(off, key)
                self.warm(f"ours {label}", on_send, 8)
                self.warm(f"ours {label} c=1", on_send, 1)
                self.warm(f"ours MAX_BATCH_SIZE=1 {label}", off_send, 8)
                extra = {"c8": self.engine_info(ours, key), "c1": self.engine_info(ours, key),
                         "c8_batch_off": {**self.engine_info(off, key), "server_env": {"MAX_BATCH_SIZE": "1"}}}
                best = self.side_by_side([("c8", on_send, 8), ("c1", on_send, 1), ("c8_batch_off", off_send, 8)],
                                         "c", label, extra)
                self.ratio("c", label, "8 vs 1", "c8", "c1", best, TARGET_C_SCALING.get(key, TARGET_C_SCALING_DEFAULT))
                self.ratio("c", label, 8, "c8", "c8_batch_off", best, None,
                           note="batching on (default MAX_BATCH_SIZE) vs MAX_BATCH_SIZE=1")
        finally:
            off.stop()

    def run(self) -> int:
        args = self.args
        self.work, cleanup_work = C.make_work_dir(args.keep_work)
        try:
            args.models_dir = C.prepare_models_dir(args.models_dir, self.work)
            C.emit({"kind": "meta", "bench": "throughput", "commit": C.git_commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "requests": args.requests, "runs": args.runs,
                    "only": sorted(args.only), "cpus": os.cpu_count(), "prompt": C.PROMPT,
                    "max_new_tokens": C.NEW_TOKENS, "server_env": self.ours_env})
            ours = C.start_ours("ours", args.models_dir, self.work, self.ours_env)
            try:
                for name in ("a", "b", "c"):
                    if name in args.only:
                        C.log(f"bench {name}")
                        try:
                            getattr(self, f"bench_{name}")(ours)
                        except KeyboardInterrupt:
                            raise
                        except Exception as exc:  # report it, go on with the next bench
                            C.emit({"kind": "error", "bench": name, "error": f"{type(exc).__name__}: {exc}"[:3000]})
                            self.failed.append(name)
            finally:
                ours.stop()
        finally:
            C.stop_all()
            cleanup_work()
        ratios = [r for r in self.results if r["kind"] == "ratio" and r["target"] is not None]
        C.emit({"kind": "summary", "bench": "throughput", "targets": len(ratios),
                "met": sum(1 for r in ratios if r["met"]),
                "missed": [f"{r['bench']} {r['model']} c={r['c']}: {r['ratio']} < {r['target']}"
                           for r in ratios if not r["met"]], "failed_benches": self.failed})
        return 1 if self.failed else 0

    @property
    def ours_env(self) -> dict:
        # MAX_LOADED_MODELS=5: all five families stay loaded; no idle unloads during a run.
        return {"MAX_LOADED_MODELS": "5", "MODEL_IDLE_TIMEOUT": "3600", **self.args.server_env}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement (default 64)")
    parser.add_argument("--runs", type=int, default=2, help="runs per measurement, best kept (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 requests per measurement")
    C.add_run_args(parser, budget=180, request_timeout=120,
                   server_env_help="extra environment for our servers (repeatable)")
    parser.add_argument("--peer-vl-cb", action="store_true",
                        help="start the qwen_vl peer with --continuous-batching anyway (it falls back)")
    args = parser.parse_args(argv)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not args.only <= {"a", "b", "c"}:
        parser.error("--only takes a, b, c")
    if args.quick:
        args.requests = min(args.requests, 16)
    args.server_env = C.parse_env_pairs(args.server_env)
    C.install_cleanup()
    try:
        return Bench(args).run()
    except KeyboardInterrupt:
        C.log("interrupted; servers stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
