"""An efficient load client: wrk (C, epoll, one thread, keep-alive) with a Lua script that sends a
distinct prompt per request, or 8-turn chats (bench/wrk/chat.lua). Measured by duration (wrk has no
request count): req/s = completed requests / seconds; latency percentiles from wrk's histogram.

Why not hey: hey sends one fixed body, so every request would share its prompt (and prefix reuse
would flatter the figure). Why not a Python client: on 2 cores a client of many threads takes CPU
from the servers it measures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "chat.lua"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_s: float
    p90_s: float
    p99_s: float
    client_cpu_s: float   # the client's own CPU seconds (user + system), to show it costs little

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 3), "p50_s": round(self.p50_s, 4), "p90_s": round(self.p90_s, 4),
                "p99_s": round(self.p99_s, 4), "client_cpu_share": round(self.client_cpu_s / self.seconds, 3)
                if self.seconds else None}


def run_wrk(url: str, *, concurrency: int, seconds: float, model: str, tokens: int = 16, mode: str = "distinct",
            salt: str = "0", turns: int = 8, chats: int = 8, path: str = "/v1/chat/completions",
            timeout_s: float = 60) -> WrkResult:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    env = dict(os.environ, WRK_PATH=path, WRK_MODEL=model, WRK_TOKENS=str(tokens), WRK_MODE=mode, WRK_SALT=salt,
               WRK_TURNS=str(turns), WRK_CHATS=str(chats))
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout_s)}s",
            "-s", str(SCRIPT), url]
    before = os.times()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    after = os.times()
    line = next((l for l in run.stdout.splitlines() if l.startswith("WRK_JSON ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}")
    data = json.loads(line[len("WRK_JSON "):])
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return WrkResult(requests=data["requests"], seconds=data["duration_us"] / 1e6, errors=errors,
                     p50_s=data["p50_us"] / 1e6, p90_s=data["p90_us"] / 1e6, p99_s=data["p99_us"] / 1e6,
                     client_cpu_s=cpu)
