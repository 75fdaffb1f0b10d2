"""GPU memory accounting of the model manager, measured on a real-size random-weight model.

Builds a Qwen3 checkpoint of real layer sizes (Qwen3-1.7B shapes by default) with random bf16
weights, then drives the REAL ModelManager + TextFamily loader + MemoryProbe on cuda:0:
  - estimate (safetensors headers) vs measured (get_memory_footprint) vs torch.cuda allocated delta
  - load seconds, decode tokens/s
  - unload: how much of the allocation comes back
  - bitsandbytes 4-bit and 8-bit on CUDA: the same figures
  - a GPU budget that holds one copy only: the second model evicts the first before loading
Prints one JSON line per measurement and a summary table of ratios. Runs on CPU too (--device cpu
--layers 2) to check the script itself.

    python bench/gpu_memory.py [--layers 28] [--hidden 2048] [--out bench/results/gpu_memory.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.hub.demo_models import build_demo_models  # noqa: E402
from utils.families import load_family  # noqa: E402
from utils.families.base import GenerationParams, GenerationRequest  # noqa: E402
from utils.serving.memory import MemoryProbe, estimate_model_bytes  # noqa: E402
from utils.serving.manager import ModelManager  # noqa: E402
from utils.config.settings import GenerationDefaults, ModelLimits, ModelSpec, ServerSettings  # noqa: E402

GIB = 2**30


def build_checkpoint(target: Path, tokenizer_dir: Path, hidden: int, layers: int, intermediate: int) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if (target / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = max(1, hidden // 128)
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         head_dim=128, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def allocated(device: str) -> int:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return MemoryProbe().read().process_rss


def make_settings(specs: dict[str, ModelSpec], gpu_budget: int | None, root: Path) -> ServerSettings:
    return ServerSettings(models=specs, models_dir=root, tmp_dir=root / "tmp", log_dir=root / "logs",
                          max_loaded_models=4, idle_timeout=-1, gpu_budget_bytes=gpu_budget, gpu_headroom_bytes=0,
                          ram_headroom_bytes=0)


def spec_for(key: str, path: Path, quantization: str, device: str) -> ModelSpec:
    return ModelSpec(key=key, repo_id=f"bench/{key}", family="text", path=path, dtype="bfloat16",
                     quantization=quantization, device=device,
                     generation=GenerationDefaults(max_new_tokens=64), limits=ModelLimits(max_new_tokens=256))


def measure(manager: ModelManager, key: str, device: str, new_tokens: int) -> dict:
    spec = manager.spec(key)
    estimate = estimate_model_bytes(spec)
    base = allocated(device)
    started = time.perf_counter()
    with manager.lease(key) as model:
        load_s = time.perf_counter() - started
        held = allocated(device) - base
        measured = model.memory_bytes()
        prepared = model.prepare(GenerationRequest(prompt="tell me about the sea " * 8))
        params = GenerationParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, do_sample=False)
        model.generate(prepared, GenerationParams(max_new_tokens=4, temperature=1.0, top_p=1.0, do_sample=False))
        t0 = time.perf_counter()
        result = model.generate(prepared, params)
        gen_s = time.perf_counter() - t0
    manager.unload(key)
    after = allocated(device)
    return {"model": key, "quantization": spec.quantization, "estimate_bytes": estimate, "measured_bytes": measured,
            "allocated_delta_bytes": held, "estimate_over_allocated": round(estimate / max(held, 1), 3),
            "load_seconds": round(load_s, 2), "decode_tokens_per_s": round(result.completion_tokens / gen_s, 1),
            "unload_returned_fraction": round((held - (after - base)) / max(held, 1), 4)}


def eviction_check(root: Path, path: Path, device: str) -> dict:
    """Two copies of the model, a budget for one: the second load must evict the first first."""
    specs = {k: spec_for(k, path, "none", device) for k in ("copy_a", "copy_b")}
    one = estimate_model_bytes(specs["copy_a"])
    manager = ModelManager(make_settings(specs, int(one * 1.5), root), load_family, estimator=estimate_model_bytes,
                           probe=MemoryProbe())
    base = allocated(device)
    with manager.lease("copy_a"):
        pass
    peak_a = allocated(device) - base
    with manager.lease("copy_b"):
        pass
    snap = manager.snapshot()
    held = allocated(device) - base
    manager.shutdown()
    return {"check": "gpu_budget_eviction", "budget_bytes": int(one * 1.5), "first_model_bytes": peak_a,
            "held_after_second_load": held, "loaded": [k for k, v in snap.items() if v["loaded"]],
            "first_unload_reason": snap["copy_a"]["last_unload_reason"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    args.work.mkdir(parents=True, exist_ok=True)
    demo = build_demo_models(args.work / "demo", ["deepseek"])
    path = args.work / f"qwen3-h{args.hidden}-l{args.layers}"
    t0 = time.perf_counter()
    build_checkpoint(path, demo["deepseek"], args.hidden, args.layers, args.intermediate)
    rows = [{"check": "environment", "torch": torch.__version__,
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "checkpoint_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
             "build_seconds": round(time.perf_counter() - t0, 1)}]
    print(json.dumps(rows[-1]), flush=True)
    quantizations = ["none", "8bit", "4bit"]
    specs = {q: spec_for(f"bench_{q}", path, q, args.device) for q in quantizations}
    manager = ModelManager(make_settings({s.key: s for s in specs.values()}, None, args.work), load_family,
                           estimator=estimate_model_bytes, probe=MemoryProbe())
    for q in quantizations:
        try:
            rows.append(measure(manager, specs[q].key, args.device, args.tokens))
        except Exception as exc:  # report and go on: one quantization failing must not hide the others
            rows.append({"model": specs[q].key, "quantization": q, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    rows.append(eviction_check(args.work, path, args.device))
    print(json.dumps(rows[-1]), flush=True)

    print("\nquantization  estimate/allocated  load_s  tok/s  unload_returned")
    for row in rows:
        if "estimate_over_allocated" in row:
            print(f"{row['quantization']:<13} {row['estimate_over_allocated']:<19} {row['load_seconds']:<7} "
                  f"{row['decode_tokens_per_s']:<6} {row['unload_returned_fraction']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    shutil.rmtree(args.work / "demo", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
