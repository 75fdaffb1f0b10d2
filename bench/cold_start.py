"""Cold start: what a request to an evicted model costs, bf16 / 8-bit / 4-bit, against plain transformers.

One run, bounded in time:
1. builds a random-weight checkpoint in Qwen3-0.6B shapes (hidden 1024, 28 layers, 16 heads / 8 KV
   heads, head_dim 128, intermediate 3072, vocab 151936, tied embeddings stored twice as the real
   checkpoint does: 1.5 GB bf16 safetensors) with the demo deepseek tokenizer, once per --models-dir;
2. page cache: one warm read of the weight file, then a timed one;
3. plain transformers in its own process: `from_pretrained` (bf16) + a 1-token greedy `generate`,
   after a first load in that process; the same for the 4-bit model saved already quantized (the
   quantized cache's entry), the floor of a cached 4-bit reload;
4. ours through the real server (`main.py`, gunicorn) with a models.yaml written here:
   max_loaded_models 1, group_window 0 (so a sequential client measures the reload itself, not
   the grouping wait), two keys per precision (bf16, 8bit, 4bit) on the same checkpoint, requests
   alternating a, b, a, b so every request evicts the other model and reloads its own. Latency of
   each such first request (1 new token, greedy) as the client sees it, and the load seconds the
   server reports. Three server processes: the first with an empty quantized cache (its first
   quantized load of each key writes the entry), a second one started afresh on that cache (the
   cache found; its very first request is reported apart), and one with QUANT_CACHE=0 (every 4-bit /
   8-bit reload quantizes: the old behaviour).

5. sequential switching with default settings (grouping on, as a user gets it): a server started
   on a models.yaml without `group_window`, one client alternating bf16_a, bf16_b, ... (1 token
   each): every request evicts the other model, and none may wait for the model it left. Reported
   with the loads' grouping waits from /admin/model_status, against plain transformers' reload.
6. the first 4-bit request after a restart: a fresh server process on the cache written in 4,
   whose very first request is q4_a (bitsandbytes not yet used in that process), sent as soon as
   /health answers (the target), and in two more fresh processes as soon as /ready answers (what a
   load balancer routes by) and a few seconds after /health; against our bf16 reload.

stdout: JSON lines ("kind": meta | measurement | ratio | summary | error | skip); progress on stderr.
A ratio is "met" when it reaches its target and no request of either side failed.

`--ram-tier` (GPU only; on a machine without CUDA it prints a "skip" line and exits 0) measures the
RAM tier instead: the same checkpoint as two bf16 keys on cuda:0 with max_loaded_models 1, requests
alternating a, b, a, b; with the tier on every request after the first two promotes its model from
(pinned) RAM, with RAM_TIER=0 it reloads it from disk (page cache). Compared: the promotion seconds
the server reports against its reload seconds (target: promotion <= 1/10 of a cold load), and the
client's latency of those requests.

    .venv/bin/python bench/cold_start.py [--rounds 4] [--uncached-rounds 2] [--models-dir DIR] [--keep-work]
    .venv/bin/python bench/cold_start.py --ram-tier [--rounds 4] [--models-dir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

CHECKPOINT = "qwen3-0.6b-shapes"
MARKER = ".cold_start_checkpoint.json"
PROMPT = "Explain quantum computing in simple terms"
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
PRECISIONS = {"bf16": "none", "q8": "8bit", "q4": "4bit"}
TARGETS = {"bf16_vs_plain": 1.5, "q4_cached_vs_bf16": 2.5, "q4_cached_vs_uncached": 0.4,
           "ram_tier_promotion_vs_cold_load": 0.1, "switch_vs_plain": 1.5, "q4_first_after_restart_vs_bf16": 2.5}
# Seconds after /health before the second fresh process gets its first 4-bit request.
SETTLED_AFTER_START = 8.0


def build_checkpoint(models_dir: Path) -> Path:
    """The 0.6B-shape checkpoint (random bf16 weights, seed 0) and the demo tokenizer, once."""
    target = models_dir / CHECKPOINT
    if (target / MARKER).is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from utils.hub.demo_models import build_demo_models
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(build_demo_models(models_dir / "demo", ["deepseek"])["deepseek"])
    config = Qwen3Config(**QWEN3_06B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    with torch.device("meta"):
        names = {name: tuple(p.shape) for name, p in Qwen3ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in names.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif name != "lm_head.weight":
            weights[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # stored twice, like Qwen3-0.6B
    staging = target.with_name(target.name + ".building")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"shapes": QWEN3_06B, "seed": 0}))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    C.log(f"built {target} in {time.monotonic() - started:.1f} s")
    return target


def page_cache_read(path: Path) -> float:
    """Seconds to read the file once it is in the page cache (one warm read first)."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
        seconds = time.perf_counter() - started
    return seconds


_PLAIN = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, tokenizer_path, rounds, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
ids = tokenizer(sys.argv[5], return_tensors="pt")
kwargs = {"dtype": torch.bfloat16} if sys.argv[6] == "bf16" else {}
def once():
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"}, **kwargs)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - started
first = once()
print(json.dumps({"first": first, "reloads": [once() for _ in range(rounds)]}))
"""


def plain_reloads(path: Path, tokenizer_path: Path, rounds: int, threads: int, kind: str, timeout: float) -> dict:
    proc = subprocess.run([C.PYTHON, "-c", _PLAIN, str(path), str(tokenizer_path), str(rounds), str(threads), PROMPT,
                           kind], capture_output=True, text=True, timeout=timeout, cwd=C.ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"plain transformers failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_config(work: Path, models_dir: Path, grouping: str = "off") -> Path:
    """grouping "off": group_window 0 (a sequential client measures the reload itself); "default":
    no group_window line (what a user gets)."""
    lines = ["server:", "  max_loaded_models: 1", "  idle_timeout: 3600", f"  models_dir: {models_dir}",
             f"  tmp_dir: {work / 'tmp'}", f"  log_dir: {work / 'logs'}", "  ram_headroom_gb: 1"] + (
        ["  group_window: 0"] if grouping == "off" else []) + ["models:"]
    for name, quantization in PRECISIONS.items():
        for side in ("a", "b"):
            lines += [f"  {name}_{side}:", "    family: text", f"    path: {CHECKPOINT}", "    dtype: bfloat16",
                      f"    quantization: {quantization}", "    generation: {max_new_tokens: 1}"]
    path = work / ("models.yaml" if grouping == "off" else "models_default.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(name: str, config: Path, work: Path, env: dict | None = None) -> C.Server:
    base = {k: v for k, v in os.environ.items() if k not in C.OUR_KNOBS + ("QUANT_CACHE", "QUANT_CACHE_DIR",
                                                                             "QUANT_CACHE_MAX_GB")}
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    base.update({"MODELS_CONFIG": str(config), "LOG_DIR": str(run_dir / "logs"), "TMP_DIR": str(run_dir / "tmp"),
                 "PYTHONUNBUFFERED": "1", **(env or {})})
    port = C.free_port()
    argv = [C.PYTHON, "main.py", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)]
    return C.Server(name, argv, base, run_dir / "server.log", port, "/health")


def request(server: C.Server, key: str, timeout: float) -> dict:
    body = {"prompt": PROMPT, "max_new_tokens": 1, "temperature": 0}
    outcome = C.post_json(f"{server.url}/generate/{key}", body, timeout)
    status = C.model_status(server).get(key, {})
    return {"key": key, "status": outcome.status, "seconds": round(outcome.seconds, 4),
            "server_load_seconds": status.get("last_load_seconds"), "load_count": status.get("load_count"),
            "server_promote_seconds": status.get("last_promote_seconds"),
            "promote_count": status.get("promote_count"),
            "error": outcome.body[:300] if outcome.status != 200 else None}


def grouping_waits(server: C.Server) -> dict:
    """Per model: loads that waited for a model spared by grouping, and the seconds they waited."""
    return {key: {"waits": info.get("grouping_waits"), "seconds": info.get("grouping_wait_seconds_total")}
            for key, info in C.model_status(server).items() if info.get("load_count")}


def alternate(server: C.Server, name: str, rounds: int, timeout: float, deadline: float) -> list[dict]:
    """a, b, a, b, ... (2 x rounds requests), each one a reload; stops early past the deadline."""
    out = []
    for i in range(2 * rounds):
        if time.monotonic() > deadline:
            break
        out.append(request(server, f"{name}_{'ab'[i % 2]}", timeout))
    return out


def summarize(rows: list[dict]) -> dict:
    ok = [r["seconds"] for r in rows if r["status"] == 200]
    loads = [r["server_load_seconds"] for r in rows if r["status"] == 200 and r["server_load_seconds"] is not None]
    return {"requests": len(rows), "errors": len(rows) - len(ok),
            "median_s": round(statistics.median(ok), 4) if ok else None,
            "min_s": round(min(ok), 4) if ok else None, "max_s": round(max(ok), 4) if ok else None,
            "median_server_load_s": round(statistics.median(loads), 4) if loads else None,
            "error_bodies": [r["error"] for r in rows if r["error"]][:3]}


def load_lines(log: Path) -> list[str]:
    """The server's own lines about loads and the cache (what the first request's load spent)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [line[-240:] for line in text.splitlines()
            if any(word in line for word in ("loaded ", "quantized cache", "warmed", "CPU layout"))][:12]


def cache_entries(models_dir: Path) -> dict:
    root = models_dir / ".quantized"
    entries = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() \
        else []
    return {"entries": entries, "bytes": sum(f.stat().st_size for name in entries for f in (root / name).iterdir()
                                             if f.is_file())}


def ratio(name: str, num: dict | None, den: dict | None, target: float | None, compare: str) -> dict:
    value = None
    if num and den and num.get("median_s") and den.get("median_s"):
        value = round(num["median_s"] / den["median_s"], 3)
    clean = bool(num and den and not num.get("errors") and not den.get("errors"))
    record = {"kind": "ratio", "name": name, "compare": compare, "ratio": value,
              "numerator_s": num.get("median_s") if num else None, "denominator_s": den.get("median_s") if den else None,
              "clean": clean}
    if target is not None:
        record.update(target=f"<= {target}", met=bool(value is not None and value <= target and clean))
    C.emit(record)
    return record


def write_ram_tier_config(work: Path, models_dir: Path) -> Path:
    lines = ["server:", "  max_loaded_models: 1", "  idle_timeout: 3600", f"  models_dir: {models_dir}",
             f"  tmp_dir: {work / 'tmp'}", f"  log_dir: {work / 'logs'}", "  group_window: 0", "  ram_headroom_gb: 1",
             "  ram_tier: {enabled: true, pin_memory: true, keep_alive: -1}", "models:"]
    for side in ("a", "b"):
        lines += [f"  tier_{side}:", "    family: text", f"    path: {CHECKPOINT}", "    dtype: bfloat16",
                  "    device: cuda:0", "    generation: {max_new_tokens: 1}"]
    path = work / "models_ram_tier.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ram_tier_main(args) -> int:
    """Promotion from the RAM tier vs a cold load of the same model (GPU only)."""
    try:
        import torch
        has_cuda = bool(torch.cuda.is_available())
    except Exception:
        has_cuda = False
    if not has_cuda:
        C.emit({"kind": "skip", "bench": "cold_start --ram-tier",
                "reason": "no CUDA GPU here: the RAM tier parks GPU models only (on a CPU-only machine it does "
                          "nothing), so there is nothing to measure; run it where a GPU is lent"})
        return 0
    C.install_cleanup()
    work, cleanup_work = C.make_work_dir(args.keep_work)
    results: dict[str, dict] = {}
    failed = False
    try:
        models_dir = Path(args.models_dir or work / "models").resolve()
        models_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = build_checkpoint(models_dir)
        C.emit({"kind": "meta", "bench": "cold_start --ram-tier", "commit": C.git_commit(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": torch.cuda.get_device_name(0),
                "weights_bytes": (checkpoint / "model.safetensors").stat().st_size, "rounds": args.rounds,
                "note": args.note})
        config = write_ram_tier_config(work, models_dir)
        for phase, env in (("ram_tier", {}), ("cold", {"RAM_TIER": "0"})):
            server = start_server(f"{phase}_server", config, work, env)
            try:
                C.log(f"{phase}: alternating tier_a / tier_b")
                rows = alternate(server, "tier", args.rounds, args.request_timeout,
                                 time.monotonic() + args.budget)
            finally:
                server.stop()
            measured = rows[2:]  # the first two are each key's first load in the process
            summary = summarize(measured)
            key = "server_promote_seconds" if phase == "ram_tier" else "server_load_seconds"
            server_side = [r[key] for r in measured if r["status"] == 200 and r[key] is not None]
            summary["median_server_s"] = round(statistics.median(server_side), 4) if server_side else None
            if phase == "ram_tier":  # every measured request must have been a promotion, not a reload
                summary["promotions"] = max((r["promote_count"] or 0 for r in rows), default=0)
                summary["reloads"] = max((r["load_count"] or 0 for r in rows), default=0) - 1
                if summary["reloads"] > 0:
                    C.emit({"kind": "error", "error": f"{summary['reloads']} reload(s) with the RAM tier on: "
                                                      f"a model was dropped instead of parked"})
                    failed = True
            results[phase] = summary
            C.emit({"kind": "measurement", "name": f"{phase}_requests", **summary, "rows": measured})
    except KeyboardInterrupt:
        C.log("interrupted; servers stopped")
        return 130
    except Exception as exc:
        C.emit({"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:3000]})
        failed = True
    finally:
        C.stop_all()
        cleanup_work()
    tier, cold = results.get("ram_tier") or {}, results.get("cold") or {}
    server = ratio("ram_tier_promotion_vs_cold_load",
                   {"median_s": tier.get("median_server_s"), "errors": tier.get("errors")},
                   {"median_s": cold.get("median_server_s"), "errors": cold.get("errors")},
                   TARGETS["ram_tier_promotion_vs_cold_load"],
                   "server seconds: promotion from pinned RAM / reload from disk of the same model")
    ratio("ram_tier_request_vs_cold_request", tier or None, cold or None, None,
          "client latency of a 1-token request: model promoted (the other one parked) / model reloaded")
    C.emit({"kind": "summary", "targets_met": server["met"], "failed": failed,
            "medians_s": {k: v.get("median_s") for k, v in results.items()}})
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="a/b reload pairs per precision and server (default 4)")
    parser.add_argument("--uncached-rounds", type=int, default=2, help="pairs with QUANT_CACHE=0 (default 2)")
    parser.add_argument("--plain-rounds", type=int, default=6, help="plain transformers reloads (default 6)")
    parser.add_argument("--budget", type=float, default=240, help="seconds per server phase (default 240)")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--models-dir", type=Path, default=None, help="reuse the checkpoint there (default: temp dir)")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--note", default=None, help="a note for the meta line (what tree was measured)")
    parser.add_argument("--ram-tier", action="store_true",
                        help="measure promotion from the RAM tier vs a cold load instead (GPU only)")
    parser.add_argument("--only", default="reload,switch,restart",
                        help="phases: reload (3-4: cache empty / restarted / off), switch (5), restart (6; needs the "
                             "4-bit entry a reload phase wrote into --models-dir); default all")
    args = parser.parse_args(argv)
    if args.ram_tier:
        return ram_tier_main(args)
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    if not only <= {"reload", "switch", "restart"}:
        parser.error("--only takes reload, switch, restart")
    C.install_cleanup()
    work, cleanup_work = C.make_work_dir(args.keep_work)
    threads = max(1, len(os.sched_getaffinity(0)) - 1)  # what the server gives torch (TORCH_THREADS default)
    results: dict[str, dict] = {}
    failed = False
    try:
        models_dir = Path(args.models_dir or work / "models").resolve()
        models_dir.mkdir(parents=True, exist_ok=True)
        if "reload" in only:
            shutil.rmtree(models_dir / ".quantized", ignore_errors=True)  # the first server starts without a cache
        checkpoint = build_checkpoint(models_dir)
        weights = checkpoint / "model.safetensors"
        C.emit({"kind": "meta", "bench": "cold_start", "commit": C.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "cpus": len(os.sched_getaffinity(0)), "torch_threads": threads, "checkpoint": QWEN3_06B,
                "weights_bytes": weights.stat().st_size, "rounds": args.rounds,
                "uncached_rounds": args.uncached_rounds, "loadavg_1m": round(os.getloadavg()[0], 2),
                "note": args.note})

        seconds = page_cache_read(weights)
        C.emit({"kind": "measurement", "name": "page_cache_read", "seconds": round(seconds, 4),
                "gb_per_s": round(weights.stat().st_size / seconds / 1e9, 2)})

        C.log("plain transformers, bf16")
        plain = plain_reloads(checkpoint, checkpoint, args.plain_rounds, threads, "bf16", 600)
        results["plain_bf16"] = {"median_s": round(statistics.median(plain["reloads"]), 4), "errors": 0,
                                 "min_s": round(min(plain["reloads"]), 4), "first_s": round(plain["first"], 4)}
        C.emit({"kind": "measurement", "name": "plain_transformers_bf16_reload", **results["plain_bf16"],
                "reloads_s": [round(s, 4) for s in plain["reloads"]]})

        config = write_config(work, models_dir)
        phases = [] if "reload" not in only else [("first_server", {}, args.rounds, ("bf16", "q8", "q4")),
                  ("restarted_server", {}, args.rounds, ("bf16", "q8", "q4")),
                  ("uncached_server", {"QUANT_CACHE": "0"}, args.uncached_rounds, ("q8", "q4"))]
        for phase, env, rounds, names in phases:
            server = start_server(phase, config, work, env)
            try:
                for name in names:
                    deadline = time.monotonic() + args.budget
                    C.log(f"{phase}: {name}")
                    rows = alternate(server, name, rounds, args.request_timeout, deadline)
                    suffix = {"first_server": "", "restarted_server": "_restarted", "uncached_server": "_uncached"}[phase]
                    if phase == "uncached_server":  # every request quantizes: all of them count
                        measured = rows
                    else:  # the first request of each key: the first load in the process (and the cache write)
                        label = f"{name}{suffix}_first" if phase == "restarted_server" or name == "bf16" \
                            else f"{name}_building"
                        results[label] = summarize(rows[:2])
                        C.emit({"kind": "measurement", "name": label, "phase": phase, **results[label],
                                "rows": rows[:2]})
                        measured = rows[2:]
                    results[f"{name}{suffix}"] = summarize(measured)
                    C.emit({"kind": "measurement", "name": f"{name}{suffix}_reload", "phase": phase,
                            **results[f"{name}{suffix}"], "rows": measured, "loadavg_1m": round(os.getloadavg()[0], 2)})
                if phase == "first_server":
                    found = cache_entries(models_dir)
                    C.emit({"kind": "measurement", "name": "quantized_cache", **found})
                    if not found["entries"]:
                        C.emit({"kind": "error", "error": "the server wrote no quantized cache entry: is the "
                                                          "cache wired into the loader (app.py)?"})
            finally:
                server.stop()

        C.log("sequential switching, default settings")
        server = None if "switch" not in only else start_server("switch_server", write_config(work, models_dir, grouping="default"), work)
        if server is not None:
            try:
                rows = alternate(server, "bf16", args.rounds, args.request_timeout, time.monotonic() + args.budget)
                waits = grouping_waits(server)
            finally:
                server.stop()
            results["switch"] = summarize(rows[2:])  # the first two: each key's first load in the process
            C.emit({"kind": "measurement", "name": "switch_default_settings", **results["switch"], "rows": rows[2:],
                    "grouping_waits": waits, "loadavg_1m": round(os.getloadavg()[0], 2)})
            if any(w["waits"] for w in waits.values()):
                C.emit({"kind": "error", "error": f"a switch waited for the model it left: {waits}"})
                failed = True

        if "restart" in only and not any(e.startswith("q4_a--") for e in cache_entries(models_dir)["entries"]):
            raise RuntimeError("no 4-bit cache entry to restart on: run the reload phases first (--only reload)")
        for label, when in (("q4_first_after_restart_at_health", "health"), ("q4_first_after_restart", "ready"),
                            ("q4_first_after_restart_settled", SETTLED_AFTER_START)):
            if "restart" not in only:
                break
            C.log(f"fresh process, first request 4-bit ({label})")
            server = start_server(f"{label}_server", config, work)
            try:
                healthy = time.monotonic()
                if when == "ready":
                    server.wait_for("/ready", args.request_timeout, poll=0.05)  # preloads over
                elif when != "health":
                    time.sleep(when)
                after_health = time.monotonic() - healthy
                row = request(server, "q4_a", args.request_timeout)
            finally:
                server.stop()
            results[label] = summarize([row])
            C.emit({"kind": "measurement", "name": label, "sent": when if isinstance(when, str) else "settled",
                    "seconds_after_health": round(after_health, 3), **results[label],
                    "rows": [row], "load_log": load_lines(work / f"{label}_server" / "server.log")})

        entry = next((models_dir / ".quantized" / e for e in cache_entries(models_dir)["entries"]
                      if e.startswith("q4_a--")), None)
        if entry is not None and "reload" in only:
            C.log("plain transformers, the 4-bit model saved quantized")
            plain4 = plain_reloads(entry, checkpoint, args.plain_rounds, threads, "prequantized", 600)
            results["plain_q4_prequantized"] = {"median_s": round(statistics.median(plain4["reloads"]), 4),
                                                "errors": 0, "min_s": round(min(plain4["reloads"]), 4)}
            C.emit({"kind": "measurement", "name": "plain_transformers_4bit_prequantized_reload",
                    **results["plain_q4_prequantized"], "reloads_s": [round(s, 4) for s in plain4["reloads"]]})
    except KeyboardInterrupt:
        C.log("interrupted; servers stopped")
        return 130
    except Exception as exc:
        C.emit({"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:3000]})
        failed = True
    finally:
        C.stop_all()
        cleanup_work()

    r = results.get
    met = [ratio("bf16_vs_plain", r("bf16"), r("plain_bf16"), TARGETS["bf16_vs_plain"],
                 "ours bf16 reload / plain transformers from_pretrained + 1 token"),
           ratio("q4_cached_vs_bf16", r("q4"), r("bf16"), TARGETS["q4_cached_vs_bf16"],
                 "ours 4-bit reload, cache found / ours bf16 reload"),
           ratio("q4_cached_vs_uncached", r("q4"), r("q4_uncached"), TARGETS["q4_cached_vs_uncached"],
                 "ours 4-bit reload, cache found / QUANT_CACHE=0 (quantizes every reload)"),
           ratio("q4_restarted_vs_uncached", r("q4_restarted"), r("q4_uncached"), TARGETS["q4_cached_vs_uncached"],
                 "same, in a restarted server")]
    ratio("q8_cached_vs_bf16", r("q8"), r("bf16"), None, "ours 8-bit reload, cache found / ours bf16 reload")
    ratio("q8_cached_vs_uncached", r("q8"), r("q8_uncached"), None, "ours 8-bit reload, cache found / QUANT_CACHE=0")
    ratio("q4_cached_vs_plain_prequantized", r("q4"), r("plain_q4_prequantized"), None,
          "ours 4-bit reload / plain from_pretrained of the saved 4-bit model + 1 token")
    ratio("q4_restarted_first_vs_uncached", r("q4_restarted_first"), r("q4_uncached"), None,
          "first 4-bit requests of a restarted server (cache found) / QUANT_CACHE=0 reload")
    met += [ratio("switch_vs_plain", r("switch"), r("plain_bf16"), TARGETS["switch_vs_plain"],
                  "one client alternating two bf16 models, default settings / plain from_pretrained + 1 token"),
            ratio("q4_first_after_restart_vs_bf16", r("q4_first_after_restart_at_health"), r("bf16") or r("switch"),
                  TARGETS["q4_first_after_restart_vs_bf16"],
                  "the first request of a fresh process, 4-bit, cache found, sent when /health answers / ours bf16 "
                  "reload")]
    ratio("q4_first_after_restart_at_ready_vs_bf16", r("q4_first_after_restart"), r("bf16") or r("switch"), None,
          "the same sent when /ready answers (what a load balancer or the image's health check routes by)")
    ratio("q4_first_after_restart_settled_vs_bf16", r("q4_first_after_restart_settled"), r("bf16") or r("switch"), None,
          f"the same {SETTLED_AFTER_START:g} s after /health / ours bf16 reload")
    ratio("bf16_first_after_restart_vs_bf16", r("bf16_restarted_first"), r("bf16"), None,
          "the first requests of a fresh process, bf16 / ours bf16 reload")
    measured = [m for m in met if m["ratio"] is not None]  # --only runs some phases
    C.emit({"kind": "summary", "targets_met": bool(measured) and all(m["met"] for m in measured),
            "not_measured": [m["name"] for m in met if m["ratio"] is None], "failed": failed,
            "medians_s": {k: v.get("median_s") for k, v in results.items()}})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
