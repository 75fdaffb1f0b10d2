"""Settings: models.yaml + environment -> typed, validated ServerSettings (the schema is
utils/config/schema.py, the value parsers utils/config/validation.py).

Everything the server reads from configuration flows through here once, at start; nothing deeper
reads os.environ. A bad value raises ConfigError with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

# Every name of the schema, importable from here as before (`from utils.config.settings import ModelSpec`).
from utils.config.schema import (_DEVICE_RE, _KEY_RE, _OPENVINO_DEVICE_RE, RUNTIMES, WEIGHT_FORMATS, OpenVINOSettings, ATTN_IMPLEMENTATIONS, BACKENDS, BATCHING,  # noqa: F401
                                 DEFAULT_CONFIG, DEMO_KEYS, DTYPES, FALLBACKS, FAMILIES, GIB, IMAGE_FAMILIES,
                                 IMAGE_SIZE_MULTIPLE, MIB, OFFLOADS, PROJECT_ROOT, QUANTIZATIONS, SEED_MAX,
                                 EngineSettings, GenerationDefaults, JobSettings, MediaSettings, ModelLimits, ModelSpec,
                                 RamTierSettings, RayGroup, RaySettings, RemoteMediaSettings, ServerSettings)
from utils.config.validation import (_bool, _check_compile, _check_image_model, _check_openvino_model, _check_remote_code, _choice, _fail, _float, _gib, _int,
                                     _keep_alive, _list, _mapping, _only_known, _optional, _resolve, _size)
from utils.config.yaml_file import read_document
from utils.hub.model_folder import checkpoint_state, read_capabilities

# ---------------------------------------------------------------- sections

_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationDefaults)}
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(ModelLimits)}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineSettings)}
_MODEL_FIELDS = {"repo_id", "family", "path", "revision", "trust_remote_code", "dtype", "quantization", "device",
                 "keep_alive", "pinned", "preload", "generation", "limits", "engine", "fallback", "max_memory",
                 "also_look_in", "timeout", "offload", "runtime", "weight_format"}
_SERVER_FIELDS = {"max_loaded_models", "idle_timeout", "models_dir", "tmp_dir", "log_dir", "max_content_length_mb",
                  "ram_budget_gb", "ram_headroom_gb", "gpu_budget_gb", "gpu_headroom_gb", "failed_load_backoff",
                  "sweep_interval", "tmp_ttl", "tmp_max_mb", "media", "remote_media", "engine", "torch_threads",
                  "gil_switch_interval",
                  "group_window", "max_pass_over", "memory_pressure_release", "pressure_margin_gb",
                  "request_timeout", "profile_max_seconds", "quant_cache", "quant_cache_dir", "quant_cache_max_gb",
                  "jobs", "ram_tier", "backend", "ray", "default_seed", "openvino"}
_JOB_FIELDS = {f.name for f in dataclasses.fields(JobSettings)}
_RAY_FIELDS = {"address", "num_cpus", "max_ongoing_requests", "health_check_period", "call_timeout", "groups",
               "app_prefix",
               "replicas", "min_replicas", "max_replicas", "replica_num_cpus", "num_gpus", "max_models_per_replica"}
_RAY_GROUP_FIELDS = {"models", "replicas", "min_replicas", "max_replicas", "num_cpus", "num_gpus",
                     "max_models_per_replica"}
_MEDIA_FIELDS = {"max_media_mb", "max_image_pixels", "max_audio_seconds", "max_video_seconds", "max_video_frames"}
_REMOTE_MEDIA_FIELDS = {"enabled", "allow_hosts", "max_mb", "timeout", "max_redirects"}
_RAM_TIER_FIELDS = {"enabled", "max_gb", "pin_memory", "keep_alive"}

# Environment variable -> key of the `server` section it overrides.
SERVER_ENV = {
    "MAX_LOADED_MODELS": "max_loaded_models",
    "MODEL_IDLE_TIMEOUT": "idle_timeout",
    "MODELS_DIR": "models_dir",
    "TMP_DIR": "tmp_dir",
    "LOG_DIR": "log_dir",
    "MAX_CONTENT_LENGTH_MB": "max_content_length_mb",
    "RAM_BUDGET_GB": "ram_budget_gb",
    "RAM_HEADROOM_GB": "ram_headroom_gb",
    "GPU_BUDGET_GB": "gpu_budget_gb",
    "GPU_HEADROOM_GB": "gpu_headroom_gb",
    "FAILED_LOAD_BACKOFF": "failed_load_backoff",
    "SWEEP_INTERVAL": "sweep_interval",
    "TMP_TTL": "tmp_ttl",
    "TMP_MAX_MB": "tmp_max_mb",
    "TORCH_THREADS": "torch_threads",
    "GIL_SWITCH_INTERVAL": "gil_switch_interval",
    "GROUP_WINDOW": "group_window",
    "MAX_PASS_OVER": "max_pass_over",
    "MEMORY_PRESSURE_RELEASE": "memory_pressure_release",
    "REQUEST_TIMEOUT": "request_timeout",
    "PROFILE_MAX_SECONDS": "profile_max_seconds",
    "PRESSURE_MARGIN_GB": "pressure_margin_gb",
    "QUANT_CACHE": "quant_cache",
    "QUANT_CACHE_DIR": "quant_cache_dir",
    "QUANT_CACHE_MAX_GB": "quant_cache_max_gb",
    "MODEL_SERVER_BACKEND": "backend",
    "DEFAULT_SEED": "default_seed",
    "VLM_SEED": "default_seed",   # seed 004's name; DEFAULT_SEED wins when both are set
}
# Environment variable -> key of the server `ray` section.
RAY_ENV = {"RAY_ADDRESS": "address", "RAY_REPLICAS": "replicas", "RAY_NUM_CPUS": "num_cpus",
           "RAY_REPLICA_NUM_CPUS": "replica_num_cpus", "RAY_NUM_GPUS": "num_gpus",
           "RAY_MAX_MODELS_PER_REPLICA": "max_models_per_replica", "RAY_APP_PREFIX": "app_prefix"}
# Environment variable -> key of the server `engine` section (the defaults of every model's engine).
ENGINE_ENV = {"BATCHING": "batching", "MAX_BATCH_SIZE": "max_batch_size", "MAX_QUEUE": "max_queue",
              "QUEUE_TIMEOUT": "queue_timeout", "PREFIX_CACHE_MB": "prefix_cache_mb"}
JOB_ENV = {"JOBS_DIR": "dir", "JOB_WORKERS": "workers", "JOB_RESULT_TTL": "result_ttl",
           "JOB_MAX_QUEUED": "max_queued", "JOB_MAX_ATTEMPTS": "max_attempts", "JOB_TIMEOUT": "timeout",
           "JOB_MAX_BODY_MB": "max_body_mb", "JOB_ORPHAN_GRACE": "orphan_grace"}
MEDIA_ENV = {"MAX_MEDIA_MB": "max_media_mb", "MAX_VIDEO_FRAMES": "max_video_frames"}
REMOTE_MEDIA_ENV = {"REMOTE_MEDIA": "enabled", "REMOTE_MEDIA_ALLOW_HOSTS": "allow_hosts",
                    "REMOTE_MEDIA_MAX_MB": "max_mb", "REMOTE_MEDIA_TIMEOUT": "timeout"}
OPENVINO_ENV = {"OPENVINO_CACHE_DIR": "cache_dir", "OPENVINO_CACHE_MAX_GB": "cache_max_gb",
                "OPENVINO_EXPORTER_DIR": "exporter_dir", "OPENVINO_EXPORT_TIMEOUT": "export_timeout"}
_OPENVINO_FIELDS = set(OPENVINO_ENV.values())
RAM_TIER_ENV = {"RAM_TIER": "enabled", "RAM_TIER_MAX_GB": "max_gb", "RAM_TIER_PIN_MEMORY": "pin_memory",
                "RAM_TIER_KEEP_ALIVE": "keep_alive"}
_HOST_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # fullmatch
# MODEL_<KEY>_<FIELD> overrides one field of one model, e.g. MODEL_DEEPSEEK_QUANTIZATION=8bit.
MODEL_ENV_FIELDS = ("quantization", "dtype", "device", "path", "keep_alive", "pinned", "preload", "revision",
                    "fallback", "offload", "runtime", "weight_format")


def _generation(raw: Any, where: str) -> GenerationDefaults:
    raw = _mapping(raw, where)
    _only_known(raw, where, _GEN_FIELDS)
    d = GenerationDefaults()
    out = GenerationDefaults(
        max_new_tokens=_int(raw.get("max_new_tokens", 256), f"{where}.max_new_tokens", minimum=1),
        temperature=_float(raw.get("temperature", 0.7), f"{where}.temperature", minimum=0.0),
        top_p=_float(raw.get("top_p", 1.0), f"{where}.top_p", minimum=1e-6),
        top_k=None if raw.get("top_k") is None else _int(raw["top_k"], f"{where}.top_k", minimum=0),
        do_sample=_bool(raw.get("do_sample", False), f"{where}.do_sample"),
        repetition_penalty=(None if raw.get("repetition_penalty") is None
                            else _float(raw["repetition_penalty"], f"{where}.repetition_penalty", minimum=0.01)),
        seed=_seed(raw.get("seed"), f"{where}.seed"),
        num_inference_steps=_int(raw.get("num_inference_steps", d.num_inference_steps),
                                 f"{where}.num_inference_steps", minimum=1),
        guidance_scale=_float(raw.get("guidance_scale", d.guidance_scale), f"{where}.guidance_scale", minimum=0.0,
                              maximum=100.0),
        true_cfg_scale=_float(raw.get("true_cfg_scale", d.true_cfg_scale), f"{where}.true_cfg_scale", minimum=0.0,
                              maximum=100.0),
        negative_prompt=None if raw.get("negative_prompt") is None else str(raw["negative_prompt"]),
        width=None if raw.get("width") is None else _int(raw["width"], f"{where}.width", minimum=IMAGE_SIZE_MULTIPLE),
        height=None if raw.get("height") is None else _int(raw["height"], f"{where}.height",
                                                           minimum=IMAGE_SIZE_MULTIPLE),
    )
    if out.top_p > 1.0:
        _fail(f"{where}.top_p", f"must be <= 1, got {out.top_p}")
    for name in ("width", "height"):
        if getattr(out, name) is not None and getattr(out, name) % IMAGE_SIZE_MULTIPLE:
            _fail(f"{where}.{name}", f"must be a multiple of {IMAGE_SIZE_MULTIPLE}, got {getattr(out, name)}")
    return out


def _seed(value: Any, where: str) -> int | None:
    if value in (None, ""):
        return None
    seed = _int(value, where, minimum=0)
    if seed > SEED_MAX:
        _fail(where, f"must be at most {SEED_MAX}; got {seed}")
    return seed


def _with_default_seed(models: dict[str, ModelSpec], seed: int | None) -> dict[str, ModelSpec]:
    """The server's default_seed as the generation seed of every model that sets none of its own."""
    if seed is None:
        return models
    return {key: spec if spec.generation.seed is not None else
            dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, seed=seed))
            for key, spec in models.items()}


def _limits(raw: Any, where: str) -> ModelLimits:
    raw = _mapping(raw, where)
    _only_known(raw, where, _LIMIT_FIELDS)
    defaults = ModelLimits()
    values = {name: raw.get(name, getattr(defaults, name)) for name in _LIMIT_FIELDS}
    return ModelLimits(**{name: None if value is None and name in _MEDIA_LIMIT_FIELDS else
                          _int(value, f"{where}.{name}", minimum=0) for name, value in values.items()})


_MEDIA_LIMIT_FIELDS = ("max_images", "max_videos", "max_audios")  # None: from the checkpoint


def _engine(raw: Any, where: str, defaults: EngineSettings) -> EngineSettings:
    """An `engine:` mapping over `defaults`: every field is checked here, once."""
    raw = _mapping(raw, where)
    _only_known(raw, where, _ENGINE_FIELDS)
    get = lambda name: raw.get(name, getattr(defaults, name))  # noqa: E731
    out = EngineSettings(
        batching=_choice(get("batching"), f"{where}.batching", BATCHING),
        max_batch_size=_int(get("max_batch_size"), f"{where}.max_batch_size", minimum=1),
        max_queue=_int(get("max_queue"), f"{where}.max_queue", minimum=1),
        queue_timeout=_float(get("queue_timeout"), f"{where}.queue_timeout", minimum=0.001),
        attn_implementation=_choice(get("attn_implementation"), f"{where}.attn_implementation",
                                    ATTN_IMPLEMENTATIONS),
        static_cache=_bool(get("static_cache"), f"{where}.static_cache"),
        compile=_bool(get("compile"), f"{where}.compile"),
        prefix_cache_mb=_int(get("prefix_cache_mb"), f"{where}.prefix_cache_mb", minimum=0),
    )
    if out.compile and not out.static_cache and out.batching == "dynamic":
        _fail(f"{where}.compile", "batching dynamic runs generate, which compiles with static_cache: true only "
                                  "(fixed shapes, CUDA); without static_cache, compile is the continuous "
                                  "engine's (its decode step, dynamic shapes, any device)")
    if out.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            _fail(f"{where}.attn_implementation", "flash_attention_2 needs the flash-attn package (CUDA only); "
                                                  "it is not installed here: use auto or sdpa")
    return out


def _model(key: str, raw: Any, models_dir: Path, env: Mapping[str, str],
           engine_defaults: EngineSettings = EngineSettings()) -> ModelSpec:
    where = f"models.{key}"
    if not _KEY_RE.match(str(key)):
        _fail(where, "model keys are lower-case letters, digits and underscores, starting with a letter")
    raw = dict(_mapping(raw, where))
    _only_known(raw, where, _MODEL_FIELDS)
    for name in MODEL_ENV_FIELDS:
        env_name = f"MODEL_{key.upper()}_{name.upper()}"
        if env.get(env_name) not in (None, ""):
            raw[name] = env[env_name]
    if not raw.get("repo_id") and not raw.get("path"):  # a local folder needs no Hub id
        _fail(where, "'repo_id' is required (or a local folder in 'path', which is then never downloaded)")
    generation = _generation(raw.get("generation"), f"{where}.generation")
    limits = _limits(raw.get("limits"), f"{where}.limits")
    if generation.max_new_tokens > limits.max_new_tokens:
        _fail(f"{where}.generation.max_new_tokens",
              f"default {generation.max_new_tokens} exceeds limits.max_new_tokens {limits.max_new_tokens}")
    device = str(raw.get("device", "auto")).strip().lower()
    runtime = _choice(raw.get("runtime", ModelSpec.runtime), f"{where}.runtime", RUNTIMES)
    if runtime == "openvino" and not _OPENVINO_DEVICE_RE.match(device):
        _fail(f"{where}.device", f"an openvino model runs on auto, cpu or gpu (an Intel GPU OpenVINO sees); got "
                                 f"{raw.get('device')!r}")
    if runtime == "pytorch" and not _DEVICE_RE.match(device):
        _fail(f"{where}.device", f"must be auto, cpu, cuda, cuda:N or mps; got {raw.get('device')!r}")
    spec = ModelSpec(
        key=key,
        repo_id=str(raw["repo_id"]) if raw.get("repo_id") else None,
        family=_choice(raw["family"], f"{where}.family", FAMILIES) if raw.get("family") else "",
        path=_resolve(raw.get("path", key), models_dir, f"{where}.path"),
        revision=str(raw.get("revision", "main")),
        trust_remote_code=_bool(raw.get("trust_remote_code", False), f"{where}.trust_remote_code"),
        dtype=_choice(raw.get("dtype", "auto"), f"{where}.dtype", DTYPES),
        quantization=_choice(raw.get("quantization", "none"), f"{where}.quantization", QUANTIZATIONS),
        device=device,
        keep_alive=_keep_alive(raw.get("keep_alive"), f"{where}.keep_alive"),
        pinned=_bool(raw.get("pinned", False), f"{where}.pinned"),
        preload=_bool(raw.get("preload", False), f"{where}.preload"),
        generation=generation,
        limits=limits,
        engine=_engine(raw.get("engine"), f"{where}.engine", engine_defaults),
        fallback=_choice(raw.get("fallback", "cpu"), f"{where}.fallback", FALLBACKS),
        max_memory=_max_memory(raw.get("max_memory"), f"{where}.max_memory"),
        also_look_in=tuple(_resolve(p, models_dir, f"{where}.also_look_in")
                           for p in _list(raw.get("also_look_in"), f"{where}.also_look_in")),
        timeout=None if raw.get("timeout") is None else _float(raw["timeout"], f"{where}.timeout", minimum=0.01),
        offload=_choice(raw.get("offload", "none"), f"{where}.offload", OFFLOADS),
        runtime=runtime,
        weight_format=_choice(raw.get("weight_format", ModelSpec.weight_format), f"{where}.weight_format",
                              WEIGHT_FORMATS),
    )
    spec = _prefer_complete_folder(spec)
    if not spec.family:
        spec = dataclasses.replace(spec, family=_inferred_family(spec, where))
    _check_image_model(spec, where)
    _check_openvino_model(spec, where, raw)
    _check_remote_code(spec, where, pinned="revision" in raw)
    _check_compile(spec, where, raw)
    return spec


def _inferred_family(spec: ModelSpec, where: str) -> str:
    """`family` read from the checkpoint's config (utils/hub/model_folder.py) where models.yaml gives none."""
    capabilities = read_capabilities(spec.path)
    if capabilities is None:
        _fail(f"{where}.family", f"not set, and {spec.path.name}/ holds no checkpoint to read it from yet: set "
                                 f"family (one of {', '.join(FAMILIES)}); it is read from config.json once the folder is there")
    if capabilities.family not in FAMILIES:
        _fail(f"{where}.family", f"not set, and the architecture of {spec.path.name}/ "
                                 f"({capabilities.architecture or 'unknown'}) does not tell it: set family "
                                 f"(one of {', '.join(FAMILIES)})")
    return capabilities.family


def _prefer_complete_folder(spec: ModelSpec) -> ModelSpec:
    """The configured folder, or else the first of `also_look_in` that holds a complete checkpoint
    (a seed-001 user's weights are found, not downloaded again)."""
    if not spec.also_look_in:
        return spec
    if checkpoint_state(spec.path) == "downloaded":
        return spec
    for folder in spec.also_look_in:
        if folder != spec.path and checkpoint_state(folder) == "downloaded":
            note = f"serving from {folder.name}/ (seed 001's folder): {spec.path.name}/ holds no complete checkpoint"
            logging.getLogger("model_server.settings").info("%s: %s", spec.key, note)
            return dataclasses.replace(spec, path=folder, path_note=note)
    return spec


def _max_memory(raw: Any, where: str) -> dict[str, int] | None:
    """{"0": "8GiB", "cpu": "32GiB"} -> {"cuda:0": bytes, "cpu": bytes}; GPUs first, as accelerate fills them."""
    if raw is None:
        return None
    raw = _mapping(raw, where)
    if not raw:
        _fail(where, "must name at least one device")
    out: dict[str, int] = {}
    for name, value in raw.items():
        text = str(name).strip().lower()
        device = f"cuda:{text}" if text.isdigit() else ("cuda:0" if text == "cuda" else text)
        if not re.match(r"^(cpu|cuda:\d+)$", device):
            _fail(f"{where}.{name}", "devices are GPU indices (0, 1, ...), cuda:N or cpu")
        out[device] = _size(value, f"{where}.{name}")
    return dict(sorted(out.items(), key=lambda item: (item[0] == "cpu", item[0])))


def _section(raw: Any, where: str, known: set[str], env: Mapping[str, str], env_names: Mapping[str, str]) -> dict:
    """A sub-section of `server` as a dict: only known keys, then its environment overrides."""
    raw = dict(_mapping(raw, where))
    _only_known(raw, where, known)
    for env_name, name in env_names.items():
        if env.get(env_name) not in (None, ""):
            raw[name] = env[env_name]
    return raw


def _media(raw: Any, env: Mapping[str, str]) -> MediaSettings:
    raw = _section(raw, "server.media", _MEDIA_FIELDS, env, MEDIA_ENV)
    d = MediaSettings()
    return MediaSettings(
        max_media_bytes=int(_float(raw.get("max_media_mb", d.max_media_bytes / MIB), "server.media.max_media_mb",
                                   minimum=0.001) * MIB),
        max_image_pixels=_int(raw.get("max_image_pixels", d.max_image_pixels), "server.media.max_image_pixels",
                              minimum=1),
        max_audio_seconds=_float(raw.get("max_audio_seconds", d.max_audio_seconds),
                                 "server.media.max_audio_seconds", minimum=0.001),
        max_video_seconds=_float(raw.get("max_video_seconds", d.max_video_seconds),
                                 "server.media.max_video_seconds", minimum=0.001),
        max_video_frames=_int(raw.get("max_video_frames", d.max_video_frames), "server.media.max_video_frames",
                              minimum=1),
    )


def _jobs(raw: Any, env: Mapping[str, str], base: Path) -> JobSettings:
    where = "server.jobs"
    raw = _section(raw, where, _JOB_FIELDS, env, JOB_ENV)
    d = JobSettings()
    return JobSettings(
        dir=None if raw.get("dir") in (None, "") else _resolve(raw["dir"], base, f"{where}.dir"),
        workers=_int(raw.get("workers", d.workers), f"{where}.workers", minimum=1),
        result_ttl=_float(raw.get("result_ttl", d.result_ttl), f"{where}.result_ttl", minimum=1),
        max_queued=_int(raw.get("max_queued", d.max_queued), f"{where}.max_queued", minimum=1),
        max_finished=_int(raw.get("max_finished", d.max_finished), f"{where}.max_finished", minimum=1),
        max_attempts=_int(raw.get("max_attempts", d.max_attempts), f"{where}.max_attempts", minimum=1),
        timeout=_float(raw.get("timeout", d.timeout), f"{where}.timeout", minimum=0.01),
        max_body_mb=_float(raw.get("max_body_mb", d.max_body_mb), f"{where}.max_body_mb", minimum=0.001),
        orphan_grace=_float(raw.get("orphan_grace", d.orphan_grace), f"{where}.orphan_grace", minimum=0),
    )


def _allowed_host(entry: Any, where: str) -> str:
    """One allow-list entry, normalised: a host name, "*.suffix", or an IP address."""
    text = str(entry).strip().lower().rstrip(".") if isinstance(entry, str) else ""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text[2:] if text.startswith("*.") else text
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        _fail(where, f"expected a host name, '*.example.com' or an IP address; got {entry!r}")
    return ("*." if text.startswith("*.") else "") + name


def _remote_media(raw: Any, env: Mapping[str, str]) -> RemoteMediaSettings:
    where = "server.remote_media"
    raw = _section(raw, where, _REMOTE_MEDIA_FIELDS, env, REMOTE_MEDIA_ENV)
    d = RemoteMediaSettings()
    hosts = raw.get("allow_hosts", list(d.allow_hosts))
    if hosts is None:
        hosts = []
    elif isinstance(hosts, str):
        hosts = [part for part in hosts.split(",") if part.strip()]
    elif not isinstance(hosts, (list, tuple)):
        _fail(f"{where}.allow_hosts", f"expected a list of host names, got {type(hosts).__name__}")
    return RemoteMediaSettings(
        enabled=_bool(raw.get("enabled", d.enabled), f"{where}.enabled"),
        allow_hosts=tuple(dict.fromkeys(_allowed_host(h, f"{where}.allow_hosts") for h in hosts)),
        max_bytes=int(_float(raw.get("max_mb", d.max_bytes / MIB), f"{where}.max_mb", minimum=0.001) * MIB),
        timeout=_float(raw.get("timeout", d.timeout), f"{where}.timeout", minimum=0.1, maximum=600),
        max_redirects=_int(raw.get("max_redirects", d.max_redirects), f"{where}.max_redirects", minimum=0),
    )


def _openvino(raw: Any, env: Mapping[str, str], base: Path) -> OpenVINOSettings:
    values = _section(raw, "server.openvino", _OPENVINO_FIELDS, env, OPENVINO_ENV)
    defaults = OpenVINOSettings()

    def folder(name: str) -> Path | None:
        return None if values.get(name) in (None, "") else _resolve(values[name], base, f"server.openvino.{name}")
    return OpenVINOSettings(
        cache_dir=folder("cache_dir"),
        cache_max_bytes=(_gib(values["cache_max_gb"], "server.openvino.cache_max_gb") if "cache_max_gb" in values
                         else defaults.cache_max_bytes),
        exporter_dir=folder("exporter_dir"),
        export_timeout=_float(values.get("export_timeout", defaults.export_timeout), "server.openvino.export_timeout",
                              minimum=1))


def _ram_tier(raw: Any, env: Mapping[str, str]) -> RamTierSettings:
    where = "server.ram_tier"
    raw = _section(raw, where, _RAM_TIER_FIELDS, env, RAM_TIER_ENV)
    d = RamTierSettings()
    keep_alive = _float(raw.get("keep_alive", d.keep_alive), f"{where}.keep_alive")
    if keep_alive < 0 and keep_alive != -1:
        _fail(f"{where}.keep_alive", f"must be -1 (until RAM is needed), 0 or a positive number of seconds; "
                                     f"got {keep_alive}")
    return RamTierSettings(
        enabled=_bool(raw.get("enabled", d.enabled), f"{where}.enabled"),
        max_bytes=_gib(raw["max_gb"], f"{where}.max_gb") if "max_gb" in raw else d.max_bytes,
        pin_memory=_bool(raw.get("pin_memory", d.pin_memory), f"{where}.pin_memory"),
        keep_alive=keep_alive,
    )


def _ray_group(name: str, raw: Any, defaults: Mapping, models: Mapping) -> RayGroup:
    """One group; `defaults`: the `ray` section's replicas / num_cpus / num_gpus / max_models_per_replica."""
    where = f"server.ray.groups.{name}"
    raw = dict(_mapping(raw, where))
    _only_known(raw, where, _RAY_GROUP_FIELDS)
    get = lambda key: _optional(raw.get(key, defaults.get(key)))  # noqa: E731
    keys = tuple(str(k) for k in _list(raw.get("models"), f"{where}.models"))
    for key in keys:
        if key not in models:
            _fail(f"{where}.models", f"no model named '{key}'")
    d = RayGroup(name)
    group = RayGroup(
        name=name, models=keys,
        replicas=None if get("replicas") is None else _int(get("replicas"), f"{where}.replicas", minimum=1),
        min_replicas=None if get("min_replicas") is None else _int(get("min_replicas"), f"{where}.min_replicas",
                                                                   minimum=0),
        max_replicas=None if get("max_replicas") is None else _int(get("max_replicas"), f"{where}.max_replicas",
                                                                   minimum=1),
        num_cpus=d.num_cpus if get("num_cpus") is None else _float(get("num_cpus"), f"{where}.num_cpus", minimum=0),
        num_gpus=None if get("num_gpus") is None else _float(get("num_gpus"), f"{where}.num_gpus", minimum=0),
        max_models_per_replica=_int(get("max_models_per_replica") or d.max_models_per_replica,
                                    f"{where}.max_models_per_replica", minimum=1),
    )
    if (group.min_replicas is None) != (group.max_replicas is None):
        _fail(where, "autoscaling needs both min_replicas and max_replicas")
    if group.max_replicas is not None and group.min_replicas > group.max_replicas:
        _fail(where, f"min_replicas {group.min_replicas} exceeds max_replicas {group.max_replicas}")
    if group.max_replicas is not None and group.replicas is not None \
            and not group.min_replicas <= group.replicas <= group.max_replicas:
        _fail(f"{where}.replicas", f"{group.replicas} (the start) must lie between min_replicas "
                                   f"{group.min_replicas} and max_replicas {group.max_replicas}")
    return group


def _ray(raw: Any, env: Mapping[str, str], models: Mapping) -> RaySettings:
    """The `ray` section: cluster-wide keys, defaults for every group, and the groups."""
    where = "server.ray"
    raw = _section(raw, where, _RAY_FIELDS, env, RAY_ENV)
    d = RaySettings()
    defaults = {"replicas": raw.get("replicas"), "min_replicas": raw.get("min_replicas"),
                "max_replicas": raw.get("max_replicas"), "num_cpus": raw.get("replica_num_cpus"),
                "num_gpus": raw.get("num_gpus"), "max_models_per_replica": raw.get("max_models_per_replica")}
    raw_groups = _mapping(raw.get("groups"), f"{where}.groups") or {"default": {}}
    groups = tuple(_ray_group(str(name), value, defaults, models) for name, value in raw_groups.items())
    named = [key for group in groups for key in group.models]
    if len(named) != len(set(named)):
        _fail(f"{where}.groups", "a model belongs to one group at most")
    if not any(not group.models for group in groups) and set(models) - set(named):
        _fail(f"{where}.groups", f"models in no group: {', '.join(sorted(set(models) - set(named)))} "
                                 f"(give one group no 'models' to take the rest)")
    return RaySettings(
        address=_optional(raw.get("address")) and str(raw["address"]),
        num_cpus=None if _optional(raw.get("num_cpus")) is None else _float(raw["num_cpus"], f"{where}.num_cpus",
                                                                             minimum=0.1),
        max_ongoing_requests=_int(raw.get("max_ongoing_requests", d.max_ongoing_requests),
                                  f"{where}.max_ongoing_requests", minimum=1),
        health_check_period=_float(raw.get("health_check_period", d.health_check_period),
                                   f"{where}.health_check_period", minimum=0.1, maximum=600),
        call_timeout=_float(raw.get("call_timeout", d.call_timeout), f"{where}.call_timeout", minimum=0.1),
        app_prefix=_app_prefix(raw.get("app_prefix", d.app_prefix), f"{where}.app_prefix"),
        groups=groups,
    )


def _app_prefix(value: Any, where: str) -> str:
    value = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", value):
        _fail(where, f"letters, digits, '_' and '-' only (1-40); got {value!r}")
    return value


_OTHER_ENV = {"MODELS_CONFIG", "DEMO_MODE"}


def settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """Of `env`, only what load_settings reads (no tokens, no unrelated secrets): what a Ray replica
    is given. Replicas download nothing (the front does), so HF_TOKEN stays behind."""
    known = set().union(SERVER_ENV, ENGINE_ENV, MEDIA_ENV, REMOTE_MEDIA_ENV, JOB_ENV, RAM_TIER_ENV, RAY_ENV,
                        _OTHER_ENV)
    per_model = tuple("_" + name.upper() for name in MODEL_ENV_FIELDS)  # MODEL_<KEY>_<FIELD>
    return {name: value for name, value in env.items()
            if name in known or (name.startswith("MODEL_") and name.endswith(per_model))}


def _gil_switch_interval(value: Any) -> float | None:
    """server.gil_switch_interval: seconds, 1 us to 0.1 s, or `python` / null for Python's own (5 ms)."""
    if value is None or str(value).strip().lower() in ("", "python", "default"):
        return None
    return _float(value, "server.gil_switch_interval", minimum=1e-6, maximum=0.1)


def load_settings(config_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  *, demo: bool | str = False) -> ServerSettings:
    """Reads models.yaml (or MODELS_CONFIG / config_path) and applies environment overrides."""
    env = os.environ if env is None else env
    path = Path(config_path or env.get("MODELS_CONFIG") or DEFAULT_CONFIG).resolve()
    document = _mapping(read_document(path), path.name)  # utils/config/yaml_file.py: every read error named
    _only_known(document, path.name, {"server", "models"})
    server = dict(_mapping(document.get("server"), "server"))
    _only_known(server, "server", _SERVER_FIELDS)
    for env_name, name in reversed(SERVER_ENV.items()):  # reversed: of two names for one key, the first wins
        if env.get(env_name) not in (None, ""):
            server[name] = env[env_name]
    base = path.parent
    models_dir = _resolve(server.get("models_dir", "models"), base, "server.models_dir")
    raw_models = _mapping(document.get("models"), "models")
    if not raw_models:
        _fail("models", "at least one model must be configured")
    raw_engine = dict(_mapping(server.get("engine"), "server.engine"))
    for env_name, name in ENGINE_ENV.items():
        if env.get(env_name) not in (None, ""):
            raw_engine[name] = env[env_name]
    engine = _engine(raw_engine, "server.engine", EngineSettings())
    default_seed = _seed(server.get("default_seed"), "server.default_seed")
    models = _with_default_seed({str(key): _model(str(key), raw, models_dir, env, engine)
                                 for key, raw in raw_models.items()}, default_seed)
    torch_threads = server.get("torch_threads")

    idle_timeout = _float(server.get("idle_timeout", 600), "server.idle_timeout")
    if idle_timeout < 0 and idle_timeout != -1:
        _fail("server.idle_timeout", f"must be -1 (never), 0 or a positive number of seconds; got {idle_timeout}")
    settings = ServerSettings(
        models=models,
        models_dir=models_dir,
        tmp_dir=_resolve(server.get("tmp_dir", "tmp"), base, "server.tmp_dir"),
        log_dir=_resolve(server.get("log_dir", "logs"), base, "server.log_dir"),
        max_loaded_models=_int(server.get("max_loaded_models", 2), "server.max_loaded_models", minimum=1),
        idle_timeout=idle_timeout,
        max_content_length=int(_float(server.get("max_content_length_mb", 64), "server.max_content_length_mb",
                                      minimum=0.001) * MIB),
        ram_budget_bytes=_gib(server.get("ram_budget_gb"), "server.ram_budget_gb"),
        ram_headroom_bytes=_gib(server.get("ram_headroom_gb", 2), "server.ram_headroom_gb") or 0,
        gpu_budget_bytes=_gib(server.get("gpu_budget_gb"), "server.gpu_budget_gb"),
        gpu_headroom_bytes=_gib(server.get("gpu_headroom_gb", 1), "server.gpu_headroom_gb") or 0,
        failed_load_backoff=_float(server.get("failed_load_backoff", 30), "server.failed_load_backoff", minimum=0),
        sweep_interval=_float(server.get("sweep_interval", 5), "server.sweep_interval", minimum=0.05,
                              maximum=3600),
        tmp_ttl=_float(server.get("tmp_ttl", 3600), "server.tmp_ttl", minimum=1),
        tmp_max_bytes=int(_float(server.get("tmp_max_mb", 2048), "server.tmp_max_mb", minimum=1) * MIB),
        media=_media(server.get("media"), env),
        remote_media=_remote_media(server.get("remote_media"), env),
        jobs=_jobs(server.get("jobs"), env, base),
        ram_tier=_ram_tier(server.get("ram_tier"), env),
        openvino=_openvino(server.get("openvino"), env, base),
        engine=engine,
        torch_threads=None if torch_threads in (None, "", "auto") else _int(torch_threads, "server.torch_threads",
                                                                           minimum=1),
        gil_switch_interval=_gil_switch_interval(server.get("gil_switch_interval", ServerSettings.gil_switch_interval)),
        group_window=(None if server.get("group_window") in (None, "", "auto") else
                      _float(server["group_window"], "server.group_window", minimum=0, maximum=3600)),
        max_pass_over=_float(server.get("max_pass_over", ServerSettings.max_pass_over), "server.max_pass_over",
                             minimum=0, maximum=3600),
        request_timeout=_float(server.get("request_timeout", ServerSettings.request_timeout), "server.request_timeout",
                               minimum=0.01),
        profile_max_seconds=_float(server.get("profile_max_seconds", ServerSettings.profile_max_seconds),
                                   "server.profile_max_seconds", minimum=0.01, maximum=3600),
        default_seed=default_seed,
        memory_pressure_release=_bool(server.get("memory_pressure_release", ServerSettings.memory_pressure_release),
                                      "server.memory_pressure_release"),
        pressure_margin_bytes=_gib(server.get("pressure_margin_gb", ServerSettings.pressure_margin_bytes / GIB),
                                   "server.pressure_margin_gb") or 0,
        quant_cache=_bool(server.get("quant_cache", ServerSettings.quant_cache), "server.quant_cache"),
        quant_cache_dir=(None if server.get("quant_cache_dir") in (None, "") else
                         _resolve(server["quant_cache_dir"], base, "server.quant_cache_dir")),
        quant_cache_max_bytes=(_gib(server["quant_cache_max_gb"], "server.quant_cache_max_gb")
                               if "quant_cache_max_gb" in server else ServerSettings.quant_cache_max_bytes),
        admin_token=env.get("ADMIN_TOKEN") or None,
        api_token=env.get("API_TOKEN") or None,
        backend=_choice(server.get("backend", ServerSettings.backend), "server.backend", BACKENDS),
        ray=_ray(server.get("ray"), env, models),
        config_path=path,
        env=env,
    )
    # DEMO_MODE=1 / --demo: the demo set; "all" (either): the architecture matrix too
    mode = str(env.get("DEMO_MODE", "") or "0").strip().lower()
    demo = "all" if "all" in (demo, mode) else demo or _bool(mode, "DEMO_MODE")
    return settings.for_demo(matrix=demo == "all") if demo else settings
