"""The quantized cache (utils/serving/quantized_cache.py) on real tiny checkpoints, its settings, local models without
a repo_id, and the lean release after an unload."""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from utils.serving.quantized_cache import (META_NAME, TMP_PREFIX, Identity, QuantizedCache, build_quantized_cache,
                                          format_cache_report, model_signature)
from utils.errors import ConfigError
from utils.families import load_family
from utils.families.base import GenerationParams, GenerationRequest
from utils.config.settings import GIB, load_settings

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0, do_sample=False)
PROMPTS = ("Explain quantum computing in simple terms", "Write a haiku about the sea")


def answers(adapter) -> list[tuple]:
    out = []
    for prompt in PROMPTS:
        result = adapter.generate(adapter.prepare(GenerationRequest(prompt=prompt)), GREEDY)
        out.append((result.text, result.reasoning, result.completion_tokens))
    return out


def served_from(adapter) -> str:
    return os.path.basename(str(adapter.model.name_or_path).rstrip("/"))


@pytest.fixture
def source(models_dir, tmp_path):
    """A private copy of the demo deepseek checkpoint (tests may change its files)."""
    target = tmp_path / "deepseek-src"
    shutil.copytree(models_dir / "demo" / "deepseek", target)
    return target


@pytest.fixture
def spec_for(make_settings, source):
    base = make_settings().models["deepseek"]

    def factory(quantization="4bit", key="deepseek", path=None):
        return dataclasses.replace(base, key=key, path=path or source, quantization=quantization)
    return factory


@pytest.fixture
def cache(tmp_path):
    return QuantizedCache(tmp_path / "quantized", max_bytes=None)


def entries(cache) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir()) if cache.root.is_dir() else []


def load(spec, cache=None):
    return load_family(spec, "cpu", cache=cache)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_miss_writes_then_hit_reads_the_same_model(spec_for, cache, bits):
    spec = spec_for(bits)
    plain = load(spec)  # no cache: quantized from the source, as before
    expected = answers(plain)
    plain.release()

    first = load(spec, cache)  # miss: quantized from the source and written
    assert served_from(first) == spec.path.name
    (entry,) = entries(cache)
    assert entry.startswith(f"deepseek--{bits}--") and (cache.root / entry / META_NAME).is_file()
    assert answers(first) == expected
    first.release()

    again = load(spec, cache)  # hit: read back already quantized
    assert served_from(again) == entry
    assert answers(again) == expected
    import bitsandbytes as bnb
    linear = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, linear) for m in again.model.modules())
    assert cache.usage() == {"deepseek": sum(f.stat().st_size for f in (cache.root / entry).iterdir())}
    assert entries(cache) == [entry]


def test_a_4bit_hit_starts_with_the_cpu_layout_bitsandbytes_would_compute(spec_for, cache):
    import bitsandbytes as bnb
    spec = spec_for("4bit")
    load(spec, cache).release()
    adapter = load(spec, cache)
    layers = [m for m in adapter.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not getattr(layers[0], "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_source_changed_is_a_new_key_and_the_old_entry_goes(spec_for, cache, source):
    spec = spec_for("4bit")
    expected = answers(load(spec, cache))
    (old,) = entries(cache)
    config = source / "generation_config.json"
    config.write_text(config.read_text())  # same content, new mtime: the key covers names, sizes, mtimes
    os.utime(config, ns=(time.time_ns() + 10**9,) * 2)
    adapter = load(spec, cache)
    assert served_from(adapter) == source.name  # rebuilt from the source, never the stale entry
    (new,) = entries(cache)
    assert new != old
    assert answers(adapter) == expected
    assert served_from(load(spec, cache)) == new


def test_a_setting_change_is_a_new_key(spec_for, cache):
    load(spec_for("4bit"), cache)
    load(dataclasses.replace(spec_for("4bit"), dtype="bfloat16"), cache)
    assert len(entries(cache)) == 1  # the same model and quantization: the superseded entry went


def test_truncated_entry_is_rebuilt_not_served(spec_for, cache):
    spec = spec_for("4bit")
    expected = answers(load(spec, cache))
    (entry,) = entries(cache)
    weights = cache.root / entry / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    adapter = load(spec, cache)
    assert served_from(adapter) == spec.path.name
    assert answers(adapter) == expected
    assert served_from(load(spec, cache)) == entry  # rebuilt under the same key, whole again


def test_entry_corrupted_in_place_fails_its_load_and_is_rebuilt(spec_for, cache, caplog):
    spec = spec_for("4bit")
    expected = answers(load(spec, cache))
    (entry,) = entries(cache)
    weights = cache.root / entry / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:  # the header's JSON, size and mtime kept as written
        handle.seek(8)
        handle.write(b"\x00garbage\x00")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="model_server.quant_cache"):
        adapter = load(spec, cache)
    assert "could not be served" in caplog.text
    assert served_from(adapter) == spec.path.name
    assert answers(adapter) == expected


_CRASH = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import dataclasses
from pathlib import Path
import transformers
from utils.serving.quantized_cache import QuantizedCache
from utils.families import load_family
from utils.config.settings import load_settings
spec = load_settings(env={"MODELS_DIR": sys.argv[2], "DEMO_MODE": "1"}).models["deepseek"]
spec = dataclasses.replace(spec, path=Path(sys.argv[3]), quantization="4bit")
def dies_mid_write(self, folder, *args, **kwargs):
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "model.safetensors").write_bytes(b"half a file")
    os._exit(3)  # the process dies here: no cleanup runs
transformers.PreTrainedModel.save_pretrained = dies_mid_write
load_family(spec, "cpu", cache=QuantizedCache(Path(sys.argv[4])))
"""


def test_a_crash_mid_write_leaves_nothing_that_is_served(spec_for, cache, models_dir, source):
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(ROOT), str(models_dir), str(source), str(cache.root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    (leftover,) = entries(cache)
    assert leftover.startswith(TMP_PREFIX)
    spec = spec_for("4bit")
    adapter = load(spec, cache)
    assert served_from(adapter) == source.name  # quantized afresh
    (entry,) = entries(cache)  # the dead writer's folder was swept when the new entry was written
    assert entry.startswith("deepseek--4bit--")


def test_a_complete_looking_temporary_folder_is_never_served(spec_for, cache):
    spec = spec_for("4bit")
    load(spec, cache)
    (entry,) = entries(cache)
    shutil.move(cache.root / entry, cache.root / f"{TMP_PREFIX}{entry}-{os.getpid()}-0badc0de")
    adapter = load(spec, cache)
    assert served_from(adapter) == spec.path.name
    assert entries(cache) == [entry]  # our own dead temporary folder swept, the new entry in place


def test_a_second_writer_of_one_entry_keeps_the_first(spec_for, cache):
    """Two processes quantize the same model at once: the later rename fails, the later writer is
    handed the entry already there (unchanged), and its own folder is gone."""
    import json
    spec = spec_for("4bit")
    adapter = load(spec, cache)  # miss: quantized and written, no forward pass yet
    (entry,) = entries(cache)
    meta = json.loads((cache.root / entry / META_NAME).read_text())
    ident = Identity(key=meta["key"], quantization=meta["quantization"], id=meta["id"], parts=meta["built_from"])
    assert cache.store(adapter.model, spec, ident) == cache.root / entry
    assert entries(cache) == [entry]
    assert json.loads((cache.root / entry / META_NAME).read_text())["created"] == meta["created"]


def test_a_write_that_fails_never_fails_the_load(spec_for, cache, monkeypatch):
    import transformers

    def fails(self, folder, *args, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fails)
    adapter = load(spec_for("4bit"), cache)
    assert answers(adapter)
    assert entries(cache) == []


def test_the_cap_evicts_the_least_recently_used_entry(spec_for, cache):
    a, b, c = spec_for("4bit"), spec_for("8bit"), spec_for("4bit", key="other")
    load(a, cache)
    time.sleep(0.05)
    load(b, cache)
    time.sleep(0.05)
    assert served_from(load(a, cache)).startswith("deepseek--4bit--")  # a hit: a is now the most recent
    usage = cache.usage()["deepseek"]
    size_a = sum(f.stat().st_size for e in entries(cache) if "4bit" in e for f in (cache.root / e).iterdir())
    cache.max_bytes = usage + size_a // 2  # a, b and another a-sized entry do not fit together
    time.sleep(0.05)
    load(c, cache)
    names = entries(cache)
    assert [n.split("--")[:2] for n in names] == [["deepseek", "4bit"], ["other", "4bit"]]  # b went, not a
    assert sum(cache.usage().values()) <= cache.max_bytes


def test_a_model_over_the_cap_is_served_but_not_cached(spec_for, tmp_path):
    small = QuantizedCache(tmp_path / "q", max_bytes=1024)
    adapter = load(spec_for("4bit"), small)
    assert answers(adapter)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_the_cache_off_quantizes_every_load(spec_for, tmp_path):
    off = QuantizedCache(tmp_path / "q", enabled=False)
    load(spec_for("4bit"), off)
    assert not (tmp_path / "q").exists()


def test_untied_weights_are_tied_again_when_equal_else_not_served():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from utils.serving.quantized_cache import CacheMismatch, QuantizedCache as Cache
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    written = {"signature": model_signature(model)}
    assert written["signature"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())  # a save undid it
    Cache._check_same(model, written)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() + 1)  # another model
    with pytest.raises(CacheMismatch):
        Cache._check_same(model, written)


def test_build_ahead_of_time_reports_each_model(make_settings, tmp_path, source):
    settings = make_settings().replace(quant_cache_dir=tmp_path / "q", quant_cache_max_bytes=None)
    settings = settings.with_model("deepseek", path=source, quantization="4bit")
    report = build_quantized_cache(settings, ["deepseek", "qwen_vl"])
    assert [(r["key"], r["status"]) for r in report] == [("deepseek", "built"), ("qwen_vl", "skipped")]
    assert report[0]["bytes"] > 0 and report[1]["reason"] == "not quantized"
    again = build_quantized_cache(settings, ["deepseek"])
    assert again[0]["status"] == "present"
    assert "deepseek" in format_cache_report(report) and "built" in format_cache_report(report)
    missing = settings.with_model("deepseek", path=tmp_path / "nowhere")
    assert build_quantized_cache(missing, ["deepseek"])[0]["status"] == "failed"
    off = settings.replace(quant_cache=False)
    assert build_quantized_cache(off, ["deepseek"])[0]["reason"] == "quant_cache is off"


# ------------------------------------------------------------------ settings and local models

def write_config(tmp_path, text):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_quant_cache_settings_defaults_environment_and_validation(tmp_path):
    settings = load_settings(env={})
    assert settings.quant_cache is True and settings.quant_cache_max_bytes == 32 * GIB
    assert settings.quant_cache_path == settings.models_dir / ".quantized"
    public = settings.public_dict()
    assert public["quant_cache"] is True and public["quant_cache_dir"] == ".quantized"
    assert public["quant_cache_max_bytes"] == 32 * GIB
    env = load_settings(env={"QUANT_CACHE": "0", "QUANT_CACHE_MAX_GB": "1.5", "QUANT_CACHE_DIR": str(tmp_path / "qc")})
    assert env.quant_cache is False and env.quant_cache_max_bytes == int(1.5 * GIB)
    assert env.quant_cache_path == tmp_path / "qc" and env.public_dict()["quant_cache_dir"] == "qc"
    config = write_config(tmp_path, "server: {quant_cache_max_gb: null, quant_cache_dir: cache}\n"
                                    "models:\n  a: {repo_id: x/y, family: text}\n")
    uncapped = load_settings(config, env={})
    assert uncapped.quant_cache_max_bytes is None and uncapped.quant_cache_path == tmp_path / "cache"
    for env_bad, needle in (({"QUANT_CACHE": "maybe"}, "server.quant_cache"),
                            ({"QUANT_CACHE_MAX_GB": "-1"}, "server.quant_cache_max_gb"),
                            ({"QUANT_CACHE_MAX_GB": "lots"}, "server.quant_cache_max_gb")):
        with pytest.raises(ConfigError, match=needle):
            load_settings(env=env_bad)


def test_a_local_folder_needs_no_repo_id(tmp_path):
    config = write_config(tmp_path, "models:\n  mine: {family: text, path: /srv/my-model}\n")
    spec = load_settings(config, env={}).models["mine"]
    assert spec.repo_id is None and str(spec.path) == "/srv/my-model"
    with pytest.raises(ConfigError, match="repo_id"):
        load_settings(write_config(tmp_path, "models:\n  mine: {family: text}\n"), env={})


def test_a_local_model_is_never_downloaded(tmp_path, models_dir):
    from utils.hub.download import download_models, format_summary
    shutil.copytree(models_dir / "demo" / "deepseek", tmp_path / "models" / "here")  # paths: under models_dir
    config = write_config(tmp_path, "models:\n  here: {family: text, path: here}\n  gone: {family: text, path: gone}\n")
    results = {r.key: r for r in download_models(load_settings(config, env={}), ["here", "gone"], progress=False,
                                                 endpoint="http://127.0.0.1:9")}
    assert results["here"].status == "skipped" and results["here"].ok
    assert results["gone"].status == "failed" and "local folder" in results["gone"].reason
    assert "(local)" in format_summary(list(results.values()))


def test_a_local_model_serves_through_the_openai_card(tmp_path, models_dir):
    from utils.api.openai_translation import model_card
    config = write_config(tmp_path, "models:\n  mine: {family: text, path: here}\n")
    assert model_card(load_settings(config, env={}).models["mine"], 0, False)["owned_by"] == "local"


# ------------------------------------------------------------------ the release after an unload

def test_release_skips_the_full_collection_when_the_dropped_model_is_gone(monkeypatch, caplog):
    from utils.serving import memory

    calls = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: calls.append(a) or 0)

    class Model:
        pass

    model = Model()
    memory.expect_freed(model)
    del model
    memory.release_cached_memory()
    assert calls == []  # freed by reference counting: nothing to walk the heap for

    cyclic = Model()
    cyclic.me = cyclic
    memory.expect_freed(cyclic)
    with caplog.at_level(logging.WARNING, logger="model_server.memory"):
        memory.release_cached_memory()
    assert len(calls) == 1 and "still referenced" in caplog.text  # (the stub collected nothing)
    del cyclic
    memory.release_cached_memory()
    assert len(calls) == 2  # nothing marked (a failed load, an OOM): the full collection as before
    gc.collect()
