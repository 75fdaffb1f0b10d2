"""Soak: minutes of mixed valid traffic over the five demo models; errors, latency, churn, RSS, temp files.

Starts our server itself (`python main.py --demo`, MAX_LOADED_MODELS=2, every other setting at its
default), sends one warm-up request to each model, then `--seconds` (default 300) of mixed VALID
traffic at `--concurrency` (default 16) with a fixed `--seed`:

  - the model: uniform over deepseek (text), qwen_vl (one PNG; two PNGs; or a short MP4), blip_vqa
    (PNG), qwen_audio (WAV, 16 kHz mono or 44.1 kHz stereo) and qwen_omni (PNG + WAV);
  - 20 % `"stream": true` (SSE, read to `data: [DONE]`; an `error` event counts as an error);
  - 15 % multipart/form-data instead of JSON (the only requests that use the server's TMP_DIR: a
    temp scope per request, spooled files above 512 KB; qwen_audio/blip_vqa multipart bodies carry a
    20 s WAV / a 512x512 noise PNG, over that threshold);
  - max_new_tokens 1..24, one of several prompts, greedy or sampled (temperature 0.7 + seed).

Request i is planned from random.Random(f"{seed}:{i}") alone, so the sequence does not depend on
thread timing. Every loop is bounded: traffic stops starting requests at the deadline (and after
`--max-requests`), each request has `--request-timeout`, the sampler stops with the traffic.

Measured (stdout, JSON lines, `"kind"`: meta | warmup | traffic | models | rss | tmp | load | summary):
  - requests, errors by status (`-1` connection, `stream_error`, `bad_body` for a 200 that is not a
    valid answer), the first bodies with the request id (`soak-<i>`, sent as X-Request-ID) and the
    server's traceback for it from LOG_DIR/server.log when there is one;
  - p50/p95 latency per model, streamed vs not, overall (successful requests);
  - loads/unloads: /admin/model_status load_count / unload_count after minus before the traffic;
  - the gunicorn worker's VmRSS (/proc/<pid>/status; the worker is the child of the main.py process)
    every `--sample-every` s (default 5); growth after warm-up = median of the last `--window` s
    (default 60) minus the median of the first `--window` s after `--warmup` s (default 60);
  - entries (files and folders, nothing excluded) under the server's TMP_DIR when the traffic is
    over (after a settle of up to 5 s) and the most seen during the run;
  - the 1-minute load average at every sample (the box may be shared: latency is noisy then).

Targets: 0 errors, RSS growth <= 50 MB, 0 temp entries left, every model served, one worker pid throughout.
Exit 1 if one misses (the work dir with the server logs is then kept).

    .venv/bin/python bench/soak.py [--seconds 300] [--concurrency 16] [--seed 0]
                                   [--models-dir DIR] [--server-env KEY=VALUE ...] [--keep-work]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402
from tests import media_samples as ms  # noqa: E402

KEYS = C.DEMO_KEYS
STREAM_SHARE = 0.20
MULTIPART_SHARE = 0.15
MAX_NEW_TOKENS = (1, 24)
RSS_GROWTH_TARGET_MB = 50.0
PROMPTS = ("Explain quantum computing in simple terms", "What is in this input?", "Describe it in one sentence.",
           "List three facts about it.", "Summarize what you perceive.", "Is there anything unusual here?",
           "Write a haiku about it.", "What colour dominates?")


# ----------------------------------------------------------------------------------------------------
# media (in memory) and the request plan


def _noise_png(size: int, seed: int) -> bytes:
    """A noise PNG: incompressible, so 512x512 is ~770 KB, over the server's 512 KB spool threshold."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


class Media(dict):
    """name -> bytes a client would upload; `b64(name)` caches the base64 text."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._b64: dict[str, str] = {}
        self._lock = threading.Lock()

    def b64(self, name: str) -> str:
        with self._lock:
            if name not in self._b64:
                self._b64[name] = ms.b64(self[name])
            return self._b64[name]


def build_media() -> Media:
    """Every medium the traffic sends, as the bytes a client would upload."""
    import base64
    return Media({
        "png_gradient": base64.b64decode(C.png_b64(224, seed=1)),  # 224x224 gradient + noise
        "png_small": ms.png(64, 48, (30, 160, 90)),
        "png_wide": ms.png(160, 96, (200, 40, 40)),
        "png_big": _noise_png(512, seed=2),                         # multipart only (spooled to tmp)
        "wav_16k": ms.wav(1.0, rate=16000, channels=1),
        "wav_44k_stereo": ms.wav(0.5),                               # resampled by the server
        "wav_long": ms.wav(20.0, rate=16000, channels=1, freq=330),  # 640 KB, multipart only (spooled)
        "mp4": ms.video("mp4", frames=8, fps=4, w=64, h=48),
    })


MIME = {"png": "image/png", "wav": "audio/wav", "mp4": "video/mp4"}


@dataclass
class Planned:
    index: int
    key: str
    stream: bool
    multipart: bool
    fields: dict                 # prompt, max_new_tokens, temperature[, seed]
    media: dict                  # field -> list of media names (image / images / audio / video)

    @property
    def request_id(self) -> str:
        return f"soak-{self.index:06d}"

    @property
    def variant(self) -> str:
        shape = "+".join(f"{f}:{len(v)}" for f, v in sorted(self.media.items())) or "text"
        return f"{self.key}/{shape}/{'multipart' if self.multipart else 'json'}/{'stream' if self.stream else 'plain'}"

    def describe(self) -> dict:
        return {"request_id": self.request_id, "model": self.key, "stream": self.stream,
                "multipart": self.multipart, "media": self.media, **self.fields}


def plan(index: int, seed: int) -> Planned:
    """Request `index` of the run seeded `seed`: a function of the two alone."""
    rng = random.Random(f"{seed}:{index}")
    key = rng.choice(KEYS)
    stream = rng.random() < STREAM_SHARE
    multipart = rng.random() < MULTIPART_SHARE
    fields = {"prompt": f"{rng.choice(PROMPTS)} (request {index})",
              "max_new_tokens": rng.randint(*MAX_NEW_TOKENS)}
    if rng.random() < 0.5:
        fields["temperature"] = 0
    else:
        fields["temperature"] = 0.7
        fields["seed"] = rng.randint(0, 2**31 - 1)
    small_images = ("png_gradient", "png_small", "png_wide")
    media: dict[str, list[str]] = {}
    if key == "qwen_vl":
        r = rng.random()
        if r < 0.6:
            media["image"] = [rng.choice(small_images)]
        elif r < 0.85:
            media["images"] = rng.sample(small_images, 2)
        else:
            media["video"] = ["mp4"]
    elif key == "blip_vqa":
        media["image"] = ["png_big" if multipart else rng.choice(small_images)]
    elif key == "qwen_audio":
        media["audio"] = ["wav_long" if multipart else rng.choice(("wav_16k", "wav_44k_stereo"))]
    elif key == "qwen_omni":
        media["image"] = [rng.choice(small_images)]
        media["audio"] = [rng.choice(("wav_16k", "wav_44k_stereo"))]
    return Planned(index, key, stream, multipart, fields, media)


# ----------------------------------------------------------------------------------------------------
# one request


@dataclass
class Result:
    index: int
    key: str
    variant: str
    stream: bool
    status: str                  # "200", "503", "-1" (connection), "stream_error", "bad_body", ...
    seconds: float
    phase: str = "soak"
    body: str = ""
    request_id: str = ""
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "200"


_tls = threading.local()


def _session() -> requests.Session:
    if getattr(_tls, "session", None) is None:
        _tls.session = requests.Session()
    return _tls.session


def _request_kwargs(p: Planned, media: Media) -> dict:
    headers = {"X-Request-ID": p.request_id}
    fields = dict(p.fields, stream=True) if p.stream else dict(p.fields)
    if not p.multipart:
        body = dict(fields)
        for name, items in p.media.items():
            encoded = [media.b64(m) for m in items]
            body[name] = encoded if name.endswith("s") else encoded[0]
        return {"json": body, "headers": headers}
    # Text fields as parts without a filename, so a body with no media is multipart too.
    parts = [(k, (None, "true" if v is True else str(v))) for k, v in fields.items()]
    for name, items in p.media.items():
        for m in items:
            ext = m.split("_")[0]
            parts.append((name, (f"{m}.{ext}", media[m], MIME[ext])))
    return {"files": parts, "headers": headers}


def send(url: str, p: Planned, media: Media, timeout: float, phase: str = "soak") -> Result:
    """POST /generate/<key> as planned; a 200 counts only when its body is a valid answer (JSON with a
    string `response` and completion_tokens <= max_new_tokens; a stream's events read to [DONE] with no
    `error` event)."""
    started = time.perf_counter()
    result = Result(p.index, p.key, p.variant, p.stream, "?", 0.0, phase, request_id=p.request_id)
    try:
        with _session().post(f"{url}/generate/{p.key}", timeout=timeout, stream=p.stream,
                             **_request_kwargs(p, media)) as resp:
            result.request_id = resp.headers.get("X-Request-ID", p.request_id)
            if resp.status_code != 200:
                result.status, result.body = str(resp.status_code), resp.text[:500]
            elif p.stream:
                _read_stream(resp, result, started, timeout)
            else:
                _check_answer(resp, result, p)
    except requests.RequestException as exc:
        result.status, result.body = "-1", f"{type(exc).__name__}: {exc}"[:500]
    result.seconds = time.perf_counter() - started
    return result


def _check_answer(resp, result: Result, p: Planned) -> None:
    try:
        answer = resp.json()
        tokens = answer["usage"]["completion_tokens"]
        if not isinstance(answer.get("response"), str) or not 0 <= tokens <= p.fields["max_new_tokens"]:
            raise ValueError("not a valid answer")
        result.status, result.completion_tokens = "200", int(tokens)
    except Exception as exc:
        result.status, result.body = "bad_body", f"{type(exc).__name__}: {resp.text[:400]}"


def _read_stream(resp, result: Result, started: float, timeout: float) -> None:
    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        result.status, result.body = "bad_body", f"content type {resp.headers.get('Content-Type')}: {resp.text[:300]}"
        return
    pieces = 0
    for line in resp.iter_lines(decode_unicode=True):
        if time.perf_counter() - started > timeout:
            result.status, result.body = "stream_timeout", f"no [DONE] after {timeout:g} s ({pieces} pieces)"
            return
        if not line or not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            result.status, result.completion_tokens = "200", pieces
            return
        try:
            event = json.loads(payload)
        except ValueError:
            result.status, result.body = "bad_body", f"event is not JSON: {payload[:300]}"
            return
        if "error" in event or not isinstance(event.get("text"), str):
            result.status, result.body = "stream_error", payload[:500]
            return
        pieces += 1
    result.status, result.body = "stream_error", f"stream ended without [DONE] after {pieces} pieces"


# ----------------------------------------------------------------------------------------------------
# the server's process, memory and temp dir


def worker_pid(master_pid: int) -> int | None:
    """The gunicorn worker: the (newest) child of the main.py process, from /proc/*/stat."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == master_pid:  # fields: state, ppid, ...; fields[19] = starttime
            children.append((int(fields[19]), int(entry)))
    return max(children)[1] if children else None


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tmp_entries(tmp_dir: Path) -> list[str]:
    """Every file and folder under tmp_dir (relative paths), nothing excluded."""
    found = []
    root = Path(tmp_dir)
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(str(Path(dirpath, name).relative_to(root)))
    return sorted(found)


def model_counts(url: str) -> dict[str, dict]:
    status = requests.get(url + "/admin/model_status", timeout=15).json()["models"]
    return {k: {"load_count": int(v.get("load_count") or 0), "unload_count": int(v.get("unload_count") or 0),
                "state": v.get("state"), "error": v.get("error")} for k, v in status.items()}


class Sampler:
    """Every `every` s until stopped: the worker's VmRSS, temp entries, load average, loaded models."""

    def __init__(self, url: str, master_pid: int, tmp_dir: Path, every: float) -> None:
        self.url, self.master_pid, self.tmp_dir, self.every = url, master_pid, Path(tmp_dir), every
        self.samples: list[dict] = []
        self.worker_pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> "Sampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def sample(self) -> dict:
        pid = worker_pid(self.master_pid)
        if pid is not None and (not self.worker_pids or self.worker_pids[-1] != pid):
            self.worker_pids.append(pid)
        rss = rss_bytes(pid) if pid else None
        try:
            loaded = requests.get(self.url + "/health", timeout=5).json().get("loaded")
        except Exception:
            loaded = None
        record = {"t": round(time.monotonic() - self._t0, 1), "rss_mb": round(rss / 2**20, 1) if rss else None,
                  "tmp_entries": len(tmp_entries(self.tmp_dir)), "loadavg_1m": round(os.getloadavg()[0], 2),
                  "loaded": loaded}
        self.samples.append(record)
        return record

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()  # one at the very end


def rss_growth(samples: list[dict], seconds: float, warmup: float, window: float) -> dict:
    """Median RSS of the last `window` s minus that of the first `window` s after `warmup` s."""
    base_lo, base_hi = warmup, warmup + window
    last_lo = max(base_hi, seconds - window)
    base = [s["rss_mb"] for s in samples if s["rss_mb"] is not None and base_lo <= s["t"] < base_hi]
    last = [s["rss_mb"] for s in samples if s["rss_mb"] is not None and s["t"] >= last_lo]
    out = {"baseline_window_s": [round(base_lo, 1), round(base_hi, 1)], "last_window_s": [round(last_lo, 1), round(seconds, 1)],
           "baseline_median_mb": statistics.median(base) if base else None,
           "last_median_mb": statistics.median(last) if last else None}
    out["growth_mb"] = (round(out["last_median_mb"] - out["baseline_median_mb"], 1)
                        if base and last else None)
    # The median of every whole `window` s from the start: a trend (a leak) or noise (which models are
    # loaded, what is in flight)?
    buckets: dict[int, list[float]] = {}
    whole = int(seconds // window)
    for s in samples:
        if s["rss_mb"] is not None and int(s["t"] // window) < whole:
            buckets.setdefault(int(s["t"] // window), []).append(s["rss_mb"])
    out["window_medians_mb"] = [statistics.median(buckets[b]) for b in sorted(buckets)]
    return out


# ----------------------------------------------------------------------------------------------------
# traffic and the report


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


def latency(results: list[Result]) -> dict:
    ok = [r.seconds for r in results if r.ok]
    return {"requests": len(results), "ok": len(ok), "p50_s": _pct(ok, 0.5), "p95_s": _pct(ok, 0.95)}


def warm_up(url: str, media: Media, timeout: float) -> list[Result]:
    """One plain JSON request per model, in order (pays each model's first load and imports)."""
    out = []
    for n, key in enumerate(KEYS):
        media_by_key = {"qwen_vl": {"image": ["png_gradient"]}, "blip_vqa": {"image": ["png_gradient"]},
                        "qwen_audio": {"audio": ["wav_16k"]}, "qwen_omni": {"image": ["png_small"], "audio": ["wav_16k"]}}
        p = Planned(-1 - n, key, False, False, {"prompt": "warm up", "max_new_tokens": 4, "temperature": 0},
                    media_by_key.get(key, {}))
        out.append(send(url, p, media, timeout, phase="warmup"))
    return out


def run_traffic(url: str, seconds: float, concurrency: int, seed: int, media: Media,
                timeout: float, max_requests: int, progress_every: float = 30.0) -> tuple[list[Result], float]:
    """Planned requests over `concurrency` threads; none starts after `seconds` or `max_requests`."""
    lock = threading.Lock()
    state = {"next": 0, "stop": False}
    results: list[Result] = []
    started = time.monotonic()
    deadline = started + seconds
    last_progress = [started]

    def worker() -> None:
        while True:
            with lock:
                now = time.monotonic()
                if state["stop"] or now >= deadline or state["next"] >= max_requests:
                    return
                i = state["next"]
                state["next"] += 1
                if now - last_progress[0] >= progress_every:
                    last_progress[0] = now
                    bad = sum(1 for r in results if not r.ok)
                    C.log(f"soak {now - started:.0f}/{seconds:.0f} s: {len(results)} done, {bad} errors")
            result = send(url, plan(i, seed), media, timeout)
            with lock:
                results.append(result)

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="soak-client")
    try:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    except BaseException:
        state["stop"] = True
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return sorted(results, key=lambda r: r.index), time.monotonic() - started


def server_tracebacks(log_dir: Path | None, request_ids: list[str], limit: int = 3) -> dict[str, list[str]]:
    """What LOG_DIR/server.log (JSON lines) says about these requests: messages, and `exc` tracebacks."""
    if not log_dir or not request_ids:
        return {}
    wanted = set(request_ids)
    found: dict[str, list[str]] = {}
    for path in sorted(Path(log_dir).glob("server.log*")):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rid = rec.get("request_id")
            if rid in wanted and (rec.get("exc") or rec.get("level") in ("ERROR", "WARNING", "CRITICAL")):
                entry = f"{rec.get('level')} {rec.get('logger')}: {rec.get('message')}"
                if rec.get("exc"):
                    entry += "\n" + str(rec["exc"])[-3000:]
                found.setdefault(rid, []).append(entry)
    return dict(list(found.items())[:limit])


def soak(url: str, master_pid: int, tmp_dir: Path, *, seconds: float = 300, concurrency: int = 16, seed: int = 0,
         warmup: float = 60, window: float = 60, sample_every: float = 5, timeout: float = 180,
         max_requests: int = 200_000, log_dir: Path | None = None) -> dict:
    """Warm-up, the traffic and every measurement against a running server. Returns the report:
    {"warmup", "traffic", "models", "rss", "tmp", "load", "summary"} (each a JSON-able dict)."""
    media = build_media()
    warm = warm_up(url, media, timeout)
    counts_before = model_counts(url)
    sampler = Sampler(url, master_pid, tmp_dir, sample_every).start()
    try:
        results, wall = run_traffic(url, seconds, concurrency, seed, media, timeout, max_requests)
    finally:
        sampler.stop()
    immediate = tmp_entries(tmp_dir)
    settle_until = time.monotonic() + 5
    left = immediate
    while left and time.monotonic() < settle_until:
        time.sleep(0.25)
        left = tmp_entries(tmp_dir)
    counts_after = model_counts(url)
    try:
        memory = requests.get(url + "/admin/memory_status", timeout=15).json()["ram"]["process_rss"]
    except Exception:
        memory = None

    everything = warm + results
    bad = [r for r in everything if not r.ok]
    errors_by_status = dict(Counter(r.status for r in bad))
    first_bad = [dict(plan(r.index, seed).describe() if r.phase == "soak" else {"request_id": r.request_id},
                      phase=r.phase, variant=r.variant, status=r.status, body=r.body,
                      seconds=round(r.seconds, 3)) for r in bad[:5]]
    traces = server_tracebacks(log_dir, [r.request_id for r in bad[:5]])
    per_model = {}
    for key in KEYS:
        mine = [r for r in results if r.key == key]
        per_model[key] = dict(latency(mine), stream_ok=sum(1 for r in mine if r.ok and r.stream),
                              errors=sum(1 for r in mine if not r.ok))
    variants = Counter(r.variant for r in results)
    variants_ok = Counter(r.variant for r in results if r.ok)

    traffic = {"kind": "traffic", "seconds": round(wall, 1), "concurrency": concurrency, "seed": seed,
               "requests": len(results), "ok": sum(1 for r in results if r.ok),
               "errors": len(bad), "errors_by_status": errors_by_status, "first_errors": first_bad,
               "server_log_for_first_errors": traces,
               "rps": round(sum(1 for r in results if r.ok) / wall, 2) if wall else None,
               "overall": latency(results),
               "streamed": latency([r for r in results if r.stream]),
               "not_streamed": latency([r for r in results if not r.stream]),
               "multipart": latency([r for r in results if "/multipart/" in r.variant]),
               "per_model": per_model,
               "variants": {v: [variants_ok[v], n] for v, n in sorted(variants.items())}}
    models = {"kind": "models",
              "loads": sum(counts_after[k]["load_count"] - counts_before[k]["load_count"] for k in counts_after),
              "unloads": sum(counts_after[k]["unload_count"] - counts_before[k]["unload_count"] for k in counts_after),
              "per_model": {k: {"loads": counts_after[k]["load_count"] - counts_before[k]["load_count"],
                                "unloads": counts_after[k]["unload_count"] - counts_before[k]["unload_count"],
                                "state_at_end": counts_after[k]["state"], "error": counts_after[k]["error"]}
                            for k in counts_after}}
    growth = rss_growth(sampler.samples, wall, warmup, window)
    rss_values = [s["rss_mb"] for s in sampler.samples if s["rss_mb"] is not None]
    rss = {"kind": "rss", "worker_pids": sampler.worker_pids, "sample_every_s": sample_every,
           "warmup_s": warmup, "window_s": window, **growth,
           "min_mb": min(rss_values) if rss_values else None, "max_mb": max(rss_values) if rss_values else None,
           "memory_status_process_rss_mb_at_end": round(memory / 2**20, 1) if memory else None,
           "samples": sampler.samples}
    tmp = {"kind": "tmp", "tmp_dir_entries_immediately": len(immediate), "tmp_dir_entries_at_end": len(left),
           "left": left[:10], "max_seen_during_run": max((s["tmp_entries"] for s in sampler.samples), default=0)}
    loads = [s["loadavg_1m"] for s in sampler.samples]
    load = {"kind": "load", "cpus": os.cpu_count(), "loadavg_1m_min": min(loads, default=None),
            "loadavg_1m_max": max(loads, default=None),
            "loadavg_1m_mean": round(statistics.mean(loads), 2) if loads else None,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    served = {k: per_model[k]["ok"] for k in KEYS}
    targets = {
        "errors": {"value": len(bad), "target": 0, "met": not bad},
        "rss_growth_mb": {"value": growth["growth_mb"], "target": f"<= {RSS_GROWTH_TARGET_MB:g}",
                          "met": growth["growth_mb"] is not None and growth["growth_mb"] <= RSS_GROWTH_TARGET_MB},
        "tmp_entries_left": {"value": len(left), "target": 0, "met": not left},
        "every_model_served": {"value": served, "target": "> 0 each", "met": all(served.values())},
        "worker_not_restarted": {"value": sampler.worker_pids, "target": "one worker pid",
                                 "met": len(sampler.worker_pids) == 1},
    }
    summary = {"kind": "summary", "pass": all(t["met"] for t in targets.values()), "targets": targets,
               "requests": len(results), "errors": len(bad), "p50_s": traffic["overall"]["p50_s"],
               "p95_s": traffic["overall"]["p95_s"], "loads": models["loads"], "unloads": models["unloads"],
               "rss_growth_mb": growth["growth_mb"], "tmp_entries_left": len(left),
               "loadavg_1m_mean": load["loadavg_1m_mean"]}
    warmup_line = {"kind": "warmup", "requests": len(warm), "ok": sum(1 for r in warm if r.ok),
                   "seconds": [round(r.seconds, 3) for r in warm]}
    return {"warmup": warmup_line, "traffic": traffic, "models": models, "rss": rss, "tmp": tmp, "load": load,
            "summary": summary}


# ----------------------------------------------------------------------------------------------------


def tracked_changes() -> list[str] | None:
    """Tracked files that differ from the commit (the server runs what is on disk, not the commit)."""
    import subprocess
    try:
        out = subprocess.run(["git", "-C", str(C.ROOT), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="seconds of traffic (default 300)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of traffic before the RSS baseline")
    parser.add_argument("--window", type=float, default=60, help="seconds of the RSS baseline and last windows")
    parser.add_argument("--sample-every", type=float, default=5)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--request-timeout", type=float, default=180)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="MODELS_DIR to reuse (demo/<key> is built there if missing); default: a temp dir")
    parser.add_argument("--server-env", action="append", metavar="KEY=VALUE",
                        help="extra environment for the server (repeatable; default: MAX_LOADED_MODELS=2 only)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temp dir with the server logs (kept anyway when a target is missed)")
    args = parser.parse_args(argv)
    if args.seconds < args.warmup + 2 * args.window:
        parser.error("--seconds must cover --warmup plus two --window (baseline and last window)")
    server_env = {"MAX_LOADED_MODELS": "2", **C.parse_env_pairs(args.server_env)}
    C.install_cleanup()
    work, cleanup_work = C.make_work_dir(args.keep_work)
    keep = args.keep_work
    try:
        models_dir = C.prepare_models_dir(args.models_dir, work)
        changed = tracked_changes()
        C.emit({"kind": "meta", "bench": "soak", "commit": C.git_commit(),
                "tracked_files_changed": changed if changed is None or len(changed) <= 20 else changed[:20] + ["..."],
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": args.seconds, "concurrency": args.concurrency, "seed": args.seed,
                "warmup_s": args.warmup, "window_s": args.window, "server_env": server_env,
                "mix": {"models": "uniform over " + ", ".join(KEYS), "stream": STREAM_SHARE,
                        "multipart": MULTIPART_SHARE, "max_new_tokens": list(MAX_NEW_TOKENS),
                        "temperature": "0 or 0.7 + seed, half each"},
                "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]})
        server = C.start_ours("soak", models_dir, work, server_env)
        run_dir = work / "soak"
        C.log(f"soak: {args.seconds:g} s at c={args.concurrency}, seed {args.seed}")
        report = soak(server.url, server.process.pid, run_dir / "tmp", seconds=args.seconds,
                      concurrency=args.concurrency, seed=args.seed, warmup=args.warmup, window=args.window,
                      sample_every=args.sample_every, timeout=args.request_timeout,
                      max_requests=args.max_requests, log_dir=run_dir / "logs")
        server.stop()
        for name in ("warmup", "traffic", "models", "rss", "tmp", "load", "summary"):
            C.emit(report[name])
        passed = report["summary"]["pass"]
        if not passed and not keep:
            keep = True
            C.log(f"a target was missed: keeping {work} (server log: {run_dir / 'server.log'}, {run_dir / 'logs'})")
        return 0 if passed else 1
    except KeyboardInterrupt:
        C.log("interrupted; servers stopped")
        return 130
    finally:
        C.stop_all()
        if keep:
            C.log(f"kept work dir {work}")
        else:
            cleanup_work()


if __name__ == "__main__":
    sys.exit(main())
