"""Tokens per second of grammar-constrained rows (response_format json_schema, a forced tool call) vs
free rows, at concurrency 8 on one server of ours (demo deepseek, greedy, max_tokens 32).

The load client is `hey` (Go, keep-alive: it costs the servers little CPU). Tokens come from the
engine's own count (/admin/model_status tokens_generated) before and after each run, divided by the
run's wall time; the kinds run alternately (free, json, tool, free, ...) and each keeps its best of
--runs. On the demo model a forward pass is tiny, so the mask's share is far larger than on a real
model: this is the worst case for the grammar's cost.

    flock /tmp/heavy.lock timeout 900 .venv/bin/python bench/structured.py [--requests 64] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "fish"]}, "notes": {"type": "array", "items": {"type": "string", "maxLength": 20}}},
    "required": ["name", "age", "pet", "notes"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}
BASE = {"model": "deepseek", "messages": [{"role": "user", "content": "describe a person and their pet"}],
        "max_tokens": 32, "temperature": 0}
KINDS = {
    "free": BASE,
    "json_schema": dict(BASE, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}),
    "tool_required": dict(BASE, tools=[TOOL], tool_choice="required"),
}


def tokens_generated(server: C.Server) -> int:
    return int(C.model_status(server)["deepseek"]["engine"]["tokens_generated"])


def run_hey(server: C.Server, body_path: Path, n: int, c: int) -> float:
    started = time.perf_counter()
    out = subprocess.run(["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", "application/json",
                          "-D", str(body_path), f"{server.url}/v1/chat/completions"],
                         capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    codes = out.stdout.partition("Status code distribution:")[2].split()
    if codes[:1] != ["[200]"] or any(code.startswith("[") and code != "[200]" for code in codes):
        raise RuntimeError(f"hey saw errors:\n{out.stdout[-1500:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    args = parser.parse_args()
    C.install_cleanup()
    work, cleanup = C.make_work_dir(keep=False)
    records = []
    try:
        models = C.prepare_models_dir(args.models_dir, work)
        server = C.start_ours("ours", models, work)
        bodies = {}
        for kind, body in KINDS.items():
            bodies[kind] = work / f"{kind}.json"
            bodies[kind].write_text(json.dumps(body))
            run_hey(server, bodies[kind], 8, args.concurrency)  # warm: load, compile the grammar once
        best: dict[str, dict] = {}
        for run in range(args.runs):
            for kind in KINDS:
                before = tokens_generated(server)
                seconds = run_hey(server, bodies[kind], args.requests, args.concurrency)
                tokens = tokens_generated(server) - before
                record = {"kind": "measurement", "rows": kind, "run": run, "concurrency": args.concurrency,
                          "requests": args.requests, "seconds": round(seconds, 3), "tokens": tokens,
                          "tokens_per_s": round(tokens / seconds, 1), "req_per_s": round(args.requests / seconds, 2)}
                C.log(json.dumps(record))
                if kind not in best or record["tokens_per_s"] > best[kind]["tokens_per_s"]:
                    best[kind] = record
        free = best["free"]["tokens_per_s"]
        for kind, record in best.items():
            records.append(dict(record, kind="best", commit=C.git_commit(),
                                ratio_to_free=round(record["tokens_per_s"] / free, 3)))
    finally:
        C.stop_all()
        cleanup()
    for record in records:
        print(json.dumps(record))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
