"""Shared pieces of the HTTP benchmarks (throughput.py, churn.py): servers, media, a bounded load loop.

Clients use only the standard library, requests, numpy and PIL. Every process started here runs in its
own session and is stopped (its whole process group, by id) by `stop_all()`, which runs at exit, on
Ctrl-C and on SIGTERM/SIGHUP.
"""
from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PROMPT = "Explain quantum computing in simple terms"
NEW_TOKENS = 16
DEMO_KEYS = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni")

# Variables of ours that a bench sets itself; inherited values are dropped so a run is reproducible.
# (--server-env KEY=VALUE on the command line passes any of them on purpose.)
OUR_KNOBS = ("MAX_BATCH_SIZE", "MAX_LOADED_MODELS", "MODEL_IDLE_TIMEOUT", "GROUP_WINDOW", "MODELS_DIR",
             "TMP_DIR", "LOG_DIR", "DEMO_MODE", "ADMIN_TOKEN", "API_TOKEN", "MODELS_CONFIG", "RAM_BUDGET_GB",
             "RAM_HEADROOM_GB", "BATCHING", "MAX_QUEUE", "QUEUE_TIMEOUT", "TORCH_THREADS", "MAX_PASS_OVER",
             "PREFIX_CACHE_MB", "GIL_SWITCH_INTERVAL")

# The peer's continuous-batching KV cache. Left unset, `transformers serve` sizes it at 60 % of the
# machine's RAM on a CPU (initialization.resolve_max_memory_percent): ~9 GB resident on a 24 GB box.
# One 256-token page per request holds prompt + 16 new tokens; 2048 batch tokens take 32 prompts at once.
PEER_CB_ARGS = ["--cb-num-blocks", "128", "--cb-max-batch-tokens", "2048"]


def add_run_args(parser, *, budget: float, request_timeout: float, server_env_help: str) -> None:
    """The options every bench shares: time bounds, checkpoints to reuse, extra server environment."""
    parser.add_argument("--budget", type=float, default=budget,
                        help=f"seconds one measurement may take; later requests are not sent (default {budget:g})")
    parser.add_argument("--request-timeout", type=float, default=request_timeout)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="MODELS_DIR to reuse (demo/<key> is built there if missing); default: a temp dir")
    parser.add_argument("--server-env", action="append", metavar="KEY=VALUE", help=server_env_help)
    parser.add_argument("--keep-work", action="store_true", help="keep the temp dir with the server logs")


def log(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


# ----------------------------------------------------------------------------------------------------
# processes


_PROCS: list["Server"] = []
_PROCS_LOCK = threading.Lock()


class Server:
    """A server process on a free loopback port, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, port: int, health: str,
                 ready_timeout: float = 180, cwd: Path = ROOT) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        with _PROCS_LOCK:
            _PROCS.append(self)
        log(f"started {name} pid {self.process.pid} on {self.url} (log {log_path})")
        self.wait_for(health, ready_timeout)

    def wait_for(self, path: str, timeout: float, poll: float = 0.3) -> None:
        """Until GET `path` answers 200 (or the process exits, or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early ({self.process.returncode}); log:\n{self.log_tail()}")
            try:
                if requests.get(self.url + path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(poll)
        raise RuntimeError(f"{self.name}: {path} not 200 in {timeout:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)  # the group this process leads (start_new_session)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # the leader is gone; make sure nothing it forked is left in its group
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._log.closed:
            self._log.close()
        with _PROCS_LOCK:
            if self in _PROCS:
                _PROCS.remove(self)
                log(f"stopped {self.name}")


def stop_all() -> None:
    with _PROCS_LOCK:
        procs = list(_PROCS)
    for proc in reversed(procs):
        try:
            proc.stop()
        except Exception as exc:  # keep stopping the others
            log(f"could not stop {proc.name}: {exc}")


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def prepare_models_dir(models_dir: Path | None, work: Path) -> Path:
    """MODELS_DIR holding demo/<key> for the five keys; built once (the builder skips current ones)."""
    root = Path(models_dir) if models_dir else work / "models"
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "utils.hub.demo_models", "--root", str(root / "demo")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building demo checkpoints failed:\n{proc.stderr[-3000:]}")
    log(f"demo checkpoints ready under {root / 'demo'} ({time.monotonic() - started:.1f} s)")
    return root


def make_work_dir(keep: bool) -> tuple[Path, Callable[[], None]]:
    work = Path(tempfile.mkdtemp(prefix="bench-"))

    def cleanup():
        if keep:
            log(f"kept work dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return work, cleanup


def parse_env_pairs(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--server-env wants KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and every process under it (vLLM's API
    server and its engine core; gunicorn's arbiter and worker), from /proc: how many cores a server
    keeps busy is the CPU it used over a measurement divided by the measurement's length."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _) in stats.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier += children
    return sum(stats[member][1] for member in tree if member in stats)


def start_ours(name: str, models_dir: Path, work: Path, env: dict | None = None, threads: int | None = None,
               unset: tuple[str, ...] = ()) -> Server:
    """`python main.py --demo` (gunicorn, one worker, threads) with the demo checkpoints in models_dir."""
    base = {k: v for k, v in os.environ.items() if k not in OUR_KNOBS}
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    base.update({"MODELS_DIR": str(models_dir), "TMP_DIR": str(run_dir / "tmp"), "LOG_DIR": str(run_dir / "logs"),
                 "DEMO_MODE": "1", "RAM_HEADROOM_GB": "0", "PYTHONUNBUFFERED": "1"})
    base.update({k: str(v) for k, v in (env or {}).items()})
    for key in unset:
        base.pop(key, None)
    port = free_port()
    argv = [PYTHON, "main.py", "--demo", "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        argv += ["--threads", str(threads)]  # default: main.py's (THREADS, 32)
    return Server(name, argv, base, run_dir / "server.log", port, "/health")


def start_peer(name: str, checkpoint: Path, work: Path, continuous_batching: bool,
               cb_args: list[str] | None = None) -> Server:
    """`transformers serve <local folder>` pinned to that checkpoint, offline, on the CPU."""
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the peer needs transformers[serving] (missing: {', '.join(missing)}): "
                           f'{PYTHON} -m pip install "transformers[serving]"')
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1")
    port = free_port()
    argv = [PYTHON, "-m", "transformers.cli.transformers", "serve", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    if continuous_batching:
        argv += ["--continuous-batching", *(PEER_CB_ARGS if cb_args is None else cb_args)]
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    server = Server(name, argv, env, run_dir / "server.log", port, "/health")
    server.checkpoint = str(checkpoint)
    server.cb_requested = continuous_batching
    return server


def start_bare_loop(name: str, checkpoint: Path, work: Path, module: str = "bench.bare_loop",
                    extra_env: dict | None = None) -> Server:
    """bench/bare_loop.py (or `module`: bench.bare_loop_split) under gunicorn (one worker, gthread, 32
    threads) on that checkpoint."""
    env = dict(os.environ, BARE_MODEL=str(checkpoint), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", **(extra_env or {}))
    port = free_port()
    argv = [PYTHON, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "32", "-b", f"127.0.0.1:{port}",
            "--timeout", "300", f"{module}:app"]
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return Server(name, argv, env, run_dir / "server.log", port, "/health")


def peer_cb_used(server: Server) -> bool | None:
    """What the peer logged for its requests: `[Request received] Model: ..., CB: True|False`."""
    found = re.findall(r"CB: (True|False)", server.log_tail(200_000))
    return None if not found else found[-1] == "True"


# ----------------------------------------------------------------------------------------------------
# media (made in memory)


def png_b64(size: int = 224, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 255 // size), (yy * 255 // size), rng.integers(0, 256, (size, size))], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wav_b64(seconds: float = 1.0, rate: int = 16000) -> str:
    import wave
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


MEDIA_BY_KEY = {"deepseek": (), "qwen_vl": ("image",), "blip_vqa": ("image",), "qwen_audio": ("audio",),
                "qwen_omni": ("image", "audio")}


def ours_payload(key: str, image: str | None = None, audio: str | None = None, prompt: str = PROMPT) -> dict:
    body = {"prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    for medium in MEDIA_BY_KEY[key]:
        body[medium] = {"image": image, "audio": audio}[medium]
    return body


def peer_payload(image: str | None = None, prompt: str = PROMPT) -> dict:
    """OpenAI chat completion, greedy, 16 new tokens; an image as a data URL content part."""
    content: str | list = prompt
    if image is not None:
        content = [{"type": "text", "text": prompt},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, "temperature": 0}


# ----------------------------------------------------------------------------------------------------
# load


_tls = threading.local()


def _session() -> requests.Session:
    if getattr(_tls, "session", None) is None:
        _tls.session = requests.Session()
    return _tls.session


@dataclass
class Outcome:
    status: int
    seconds: float
    completion_tokens: int | None = None
    body: str = ""


@dataclass
class LoadResult:
    requests: int
    ok: int
    errors: int
    seconds: float
    truncated: bool
    completion_tokens: list = field(default_factory=list)
    error_bodies: list = field(default_factory=list)
    latencies: list = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        toks = self.completion_tokens
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 3), "truncated": self.truncated,
                "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                "mean_completion_tokens": round(sum(toks) / len(toks), 2) if toks else None,
                "error_bodies": self.error_bodies[:3]}


def post_json(url: str, body: dict, timeout: float, usage_path: tuple = ("usage", "completion_tokens")) -> Outcome:
    started = time.perf_counter()
    try:
        resp = _session().post(url, json=body, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(-1, time.perf_counter() - started, body=f"{type(exc).__name__}: {exc}"[:300])
    elapsed = time.perf_counter() - started
    if resp.status_code != 200:
        return Outcome(resp.status_code, elapsed, body=resp.text[:300])
    tokens = None
    try:
        value = resp.json()
        for part in usage_path:
            value = value[part]
        tokens = int(value)
    except Exception:
        pass
    return Outcome(200, elapsed, tokens)


def run_load(send, n: int, concurrency: int, budget_s: float) -> LoadResult:
    """n calls of send(i) -> Outcome over `concurrency` threads; stops starting new ones after budget_s."""
    lock = threading.Lock()
    state = {"next": 0, "truncated": False, "stop": False}
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    deadline = started + budget_s

    def worker():
        while True:
            with lock:
                if state["next"] >= n or state["stop"]:
                    return
                if time.perf_counter() > deadline:
                    state["truncated"] = True
                    return
                i = state["next"]
                state["next"] += 1
            outcome = send(i)
            with lock:
                outcomes.append(outcome)

    threads = max(1, min(concurrency, n))
    pool = ThreadPoolExecutor(threads)
    try:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    except BaseException:  # Ctrl-C / SIGTERM: send nothing more; the caller stops the servers
        state["stop"] = True
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    seconds = time.perf_counter() - started
    ok = [o for o in outcomes if o.status == 200]
    bad = [o for o in outcomes if o.status != 200]
    return LoadResult(requests=len(outcomes), ok=len(ok), errors=len(bad), seconds=seconds,
                      truncated=state["truncated"],
                      completion_tokens=[o.completion_tokens for o in ok if o.completion_tokens is not None],
                      error_bodies=[f"{o.status}: {o.body}" for o in bad[:3]],
                      latencies=[o.seconds for o in ok])


def model_status(server: Server, timeout: float = 10) -> dict:
    resp = requests.get(server.url + "/admin/model_status", timeout=timeout)
    resp.raise_for_status()
    return resp.json().get("models", {})


def build_tiny_qwen3(out: Path, *, vocab_size: int | None = None, words_only: bool = False, **config) -> None:
    """A random-weight bf16 Qwen3 in `out` (once) with the demo's byte-level BPE tokenizer and chat template
    (they convert to OpenVINO and load in vLLM). vocab_size: the tokenizer's when None. words_only: every
    token but the demo's words gets a zero embedding (tied: never chosen), so greedy never ends early."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from utils.hub.demo_models import _WORDS
    from utils.hub.demo_openvino import EOS, PAD, _WORD_TOKEN, byte_level_tokenizer

    if (out / "config.json").is_file():
        return
    tok = byte_level_tokenizer(_WORDS)
    eos_id, pad_id = tok.convert_tokens_to_ids([EOS, PAD])
    vocab_size = vocab_size or len(tok)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id,
                                         **config)).to(torch.bfloat16)
    if words_only:
        keep = torch.zeros(vocab_size, dtype=torch.bool)
        keep[[i for token, i in tok.get_vocab().items() if _WORD_TOKEN.match(token)]] = True
        with torch.no_grad():
            model.model.embed_tokens.weight[~keep] *= 0.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False).save_pretrained(out)
