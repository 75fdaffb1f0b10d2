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

  e. (issue 29) an efficient client, wrk with a distinct prompt per request (bench/load_client.py):
     ours vs `transformers serve --continuous-batching` vs a bare dynamic-batching loop
     (bench/bare_loop.py), all three through /v1/chat/completions on demo deepseek, c = 1, 8, 32
     (targets: ours/peer >= 1.5x, 2x, 2.5x; ours/bare >= 1.0x)
  m. (issue 29) 8-turn chats at c=8 (a shared system prompt; every turn sends the earlier turns again)
     on an 8-layer hidden-1024 Qwen3 the bench builds (a prefill that costs something):
     ours with prefix reuse vs ours with PREFIX_CACHE_MB=0: time to first token (p50 latency of
     max_tokens=1 requests; target on/off <= 0.5x) and req/s at 16 tokens
  --profile: ours under the distinct-prompt load at c=8 (--profile-concurrency) while POST /admin/profile records; prints
     the engine's phases by total time and the operators by self time (one "profile" JSON line)

a, b and c use the older Python client (a requests.Session per thread): on 2 cores it takes CPU from
the servers it measures; e and m use wrk.

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
from bench.load_client import run_wrk  # noqa: E402

TARGETS_A = {1: 0.95, 8: 1.2, 32: 1.2}
TARGET_B = 2.5
TARGET_C_SCALING = {"deepseek": 2.0}  # others: 1.5
TARGET_C_SCALING_DEFAULT = 1.5
TARGETS_E_PEER = {1: 1.5, 8: 2.0, 32: 2.5}
TARGET_E_BARE = 1.0
TARGET_M_TTFT = 0.5  # prefix reuse on / off, lower is better


class Bench:
    def __init__(self, args):
        self.args = args
        self.image = C.png_b64(224)
        self.audio = C.wav_b64(1.0)
        self.results: list[dict] = []
        self.failed: list[str] = []
        self.salt = int(time.time()) % 100000  # prompts differ from run to run too

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

    # --- issue 29: wrk, distinct prompts, the bare loop, multi-turn chats, the profiler ------------

    def wrk_round(self, cases: list[tuple[str, str, str, int]], bench: str, model: str, mode: str = "distinct",
                  tokens: int = C.NEW_TOKENS) -> dict:
        """cases = [(side, url, model field, c)], measured in turn --runs times (A, B, C, A, B, C...);
        each measurement sends prompts no other measurement sent (its own salt); best req/s per side."""
        best, runs = {}, {side: [] for side, *_ in cases}
        load_before = round(os.getloadavg()[0], 2)
        for round_no in range(self.args.runs):
            for side, url, model_field, c in cases:
                self.salt += 1
                result = run_wrk(url, concurrency=c, seconds=self.args.seconds, model=model_field, tokens=tokens,
                                 mode=mode, salt=f"{self.salt}", chats=c)
                runs[side].append(round(result.rps, 3))
                if side not in best or result.rps > best[side].rps:
                    best[side] = result
        for side, _, _, c in cases:
            record = {"kind": "measurement", "bench": bench, "model": model, "side": side, "c": c, "client": "wrk",
                      "mode": mode, "max_tokens": tokens, **best[side].summary(), "rps_runs": runs[side],
                      "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)]}
            C.emit(record)
            self.results.append(record)
        return best

    def wrk_ratio(self, bench: str, model: str, c, num: str, den: str, best: dict, target: float | None,
                  field: str = "rps", lower_is_better: bool = False, **extra) -> None:
        a, b = getattr(best[num], field), getattr(best[den], field)
        value = a / b if b else None
        clean = best[num].errors == 0 and best[den].errors == 0
        met = None
        if target is not None and value is not None:
            met = clean and (value <= target if lower_is_better else value >= target)
        record = {"kind": "ratio", "bench": bench, "model": model, "c": c, "compare": f"{num} / {den} ({field})",
                  f"{num}_{field}": round(a, 4), f"{den}_{field}": round(b, 4),
                  "ratio": round(value, 3) if value is not None else None, "target": target,
                  "target_is": "at most" if lower_is_better else "at least", "met": met, "clean": clean, **extra}
        C.emit(record)
        self.results.append(record)

    def warm_wrk(self, label: str, url: str, model_field: str, c: int) -> None:
        started = time.monotonic()
        first = C.post_json(url, {"model": model_field, "messages": [{"role": "user", "content": "hello"}],
                                  "max_tokens": 4, "temperature": 0}, self.args.request_timeout)
        if first.status != 200:  # the first request loads the model (ours) or initialises (the peer)
            raise RuntimeError(f"warm-up of {label} failed: {first.status} {first.body}")
        for _ in range(2):  # the peer's first requests compile and allocate
            self.salt += 1
            result = run_wrk(url, concurrency=c, seconds=2, model=model_field, salt=f"warm{self.salt}", chats=c)
        if result.errors:  # (none finished in 2 s is no failure: a slow peer at c=32)
            raise RuntimeError(f"warm-up of {label} failed: {result.summary()}")
        C.log(f"warmed {label} at c={c} ({time.monotonic() - started:.1f} s)")

    def bench_e(self, ours: C.Server) -> None:
        checkpoint = self.args.models_dir / "demo" / "deepseek"
        bare = C.start_bare_loop("bare_loop_deepseek", checkpoint, self.work)
        peer = None if self.args.no_peer else C.start_peer("peer_cb_deepseek", checkpoint, self.work, True)
        try:
            sides = [("ours", f"{ours.url}/v1/chat/completions", "deepseek"),
                     ("bare", f"{bare.url}/v1/chat/completions", "deepseek")]
            if peer is not None:
                sides.append(("peer", f"{peer.url}/v1/chat/completions", str(checkpoint)))
            for c in self.args.concurrency:
                for side, url, model_field in sides:
                    self.warm_wrk(f"{side} deepseek", url, model_field, c)
                best = self.wrk_round([(side, url, model_field, c) for side, url, model_field in sides],
                                      "e", "deepseek")
                self.wrk_ratio("e", "deepseek", c, "ours", "bare", best, TARGET_E_BARE)
                if peer is not None:
                    self.wrk_ratio("e", "deepseek", c, "ours", "peer", best, TARGETS_E_PEER.get(c),
                                   peer_cb_used=C.peer_cb_used(peer))
        finally:
            for server in (peer, bare):
                if server is not None:
                    server.stop()

    def bench_m(self, ours: C.Server) -> None:
        """On a checkpoint whose prefill costs something (the demo's 2 tiny layers prefill 300 tokens in
        about what a decode step costs, so reuse has nothing to save there): Qwen3, 8 layers of hidden
        1024, random weights (192 MB: the prefix cache's cap, a quarter of the weights, holds the 8
        chats), the demo's byte-level tokenizer; two servers of ours, reuse on and off."""
        key = "chat_mid"
        checkpoint = self.work / key
        C.build_tiny_qwen3(checkpoint, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                           tie_word_embeddings=True)
        config = self.work / "models_m.yaml"
        config.write_text("server:\n  max_loaded_models: 1\n  idle_timeout: -1\nmodels:\n"
                          f"  {key}: {{path: {checkpoint}, family: text, dtype: bfloat16}}\n")
        env = {**self.ours_env, "MODELS_CONFIG": str(config), "DEMO_MODE": "0"}
        on = C.start_ours("ours_prefix_on", self.args.models_dir, self.work, env)
        off = C.start_ours("ours_prefix_off", self.args.models_dir, self.work, {**env, "PREFIX_CACHE_MB": "0"})
        try:
            c = 8
            sides = [("reuse_on", f"{on.url}/v1/chat/completions"), ("reuse_off", f"{off.url}/v1/chat/completions")]
            for side, url in sides:
                self.warm_wrk(f"ours {side}", url, key, c)
            cases = [(side, url, key, c) for side, url in sides]
            model = f"{key} 8-turn chats"
            first = self.wrk_round(cases, "m", model, mode="chat", tokens=1)
            self.wrk_ratio("m", model, c, "reuse_on", "reuse_off", first, TARGET_M_TTFT,
                           field="p50_s", lower_is_better=True, note="time to first token: p50 latency at max_tokens=1")
            full = self.wrk_round(cases, "m", model, mode="chat", tokens=C.NEW_TOKENS)
            self.wrk_ratio("m", model, c, "reuse_on", "reuse_off", full, None, note="req/s at 16 tokens")
            for side, server in (("reuse_on", on), ("reuse_off", off)):
                C.emit({"kind": "engine", "bench": "m", "side": side, **self.engine_info(server, key)})
        finally:
            for server in (on, off):
                server.stop()

    def profile(self, ours: C.Server) -> None:
        """Profiles ours under load; prints the phases and operators that take the time."""
        import gzip
        import json
        import threading

        from utils.ops.profiler import PHASES, phase_totals

        url = f"{ours.url}/v1/chat/completions"
        c = self.args.profile_concurrency
        self.warm_wrk("ours deepseek", url, "deepseek", c)
        seconds = self.args.profile_seconds
        load = threading.Thread(target=run_wrk, args=(url,), kwargs=dict(
            concurrency=c, seconds=seconds + 2, model="deepseek", salt="profile", chats=c))
        load.start()
        time.sleep(1)
        reply = C._session().post(f"{ours.url}/admin/profile", params={"seconds": seconds, "model": "deepseek"},
                                  timeout=seconds + 120)
        load.join()
        reply.raise_for_status()
        events = json.loads(gzip.decompress(reply.content))["traceEvents"]
        phases = phase_totals(events, PHASES)
        ops: dict[str, float] = {}
        for event in events:
            if event.get("ph") == "X" and event.get("cat") == "cpu_op":
                ops[event["name"]] = ops.get(event["name"], 0.0) + event.get("dur", 0) / 1e6
        top_phases = sorted(phases.items(), key=lambda kv: -kv[1]["seconds"])
        record = {"kind": "profile", "bench": "profile", "model": "deepseek", "c": c, "seconds": seconds,
                  "phases": {name: {"seconds": round(v["seconds"], 3), "count": v["count"],
                                    "share_of_window": round(v["seconds"] / seconds, 3)} for name, v in top_phases},
                  "top_operators_total_s": {name: round(t, 3) for name, t in
                                            sorted(ops.items(), key=lambda kv: -kv[1])[:12]},
                  "trace_bytes": len(reply.content)}
        if self.args.trace_out:
            Path(self.args.trace_out).write_bytes(reply.content)
            record["trace"] = str(self.args.trace_out)
        C.emit(record)
        for name, value in top_phases:
            C.log(f"  {name:24s} {value['seconds']:7.3f} s  x{value['count']}")

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
                if args.profile:
                    self.profile(ours)
                for name in ("a", "b", "c", "e", "m"):
                    if name in args.only and not args.profile:
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
    parser.add_argument("--only", default="e,m", help="comma-separated subset of a,b,c,e,m (default e,m)")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement (default 64)")
    parser.add_argument("--runs", type=int, default=2, help="runs per measurement, best kept (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 requests per measurement")
    C.add_run_args(parser, budget=180, request_timeout=120,
                   server_env_help="extra environment for our servers (repeatable)")
    parser.add_argument("--seconds", type=float, default=4, help="seconds per wrk measurement (e, m; default 4)")
    parser.add_argument("--concurrency", default="1,8,32", help="concurrency levels of bench e (default 1,8,32)")
    parser.add_argument("--no-peer", action="store_true", help="bench e without transformers serve")
    parser.add_argument("--profile", action="store_true", help="profile ours under load instead of the benches")
    parser.add_argument("--profile-seconds", type=float, default=3)
    parser.add_argument("--profile-concurrency", type=int, default=8, help="--profile: wrk's connections (default 8)")
    parser.add_argument("--trace-out", type=Path, default=None, help="--profile: save the trace (.json.gz) here")
    parser.add_argument("--peer-vl-cb", action="store_true",
                        help="start the qwen_vl peer with --continuous-batching anyway (it falls back)")
    args = parser.parse_args(argv)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not args.only <= {"a", "b", "c", "e", "m"}:
        parser.error("--only takes a, b, c, e, m")
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
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
