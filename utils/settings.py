"""Settings: models.yaml + environment -> typed, validated ServerSettings.

Everything the server reads from configuration flows through here once, at start; nothing deeper
reads os.environ. A bad value raises ConfigError with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from utils.config_file import read_document
from utils.errors import ConfigError

GIB = 2**30
MIB = 2**20
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "models.yaml"

FAMILIES = ("text", "vision_language", "vqa", "audio", "omni", "text_to_image", "image_edit", "janus",
            "speech_to_text")
IMAGE_FAMILIES = ("text_to_image", "image_edit")  # diffusers pipelines: images out (utils/families/diffusion.py)
OFFLOADS = ("none", "model", "sequential")        # image families on small GPUs (CUDA only)
IMAGE_SIZE_MULTIPLE = 16                         # FLUX and Qwen-Image: VAE factor 8 x 2x2 latent patches
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING = ("auto", "continuous", "dynamic")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FALLBACKS = ("cpu", "none")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30,
               "tb": 10**12, "tib": 2**40}
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SEED_MAX = 2**63 - 1  # the largest seed a request or the config may give (torch takes 64-bit seeds)


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = False
    repetition_penalty: float | None = None
    # Seed of a request that gives none (None: a fresh one each time); server `default_seed` fills it
    # for every model whose own `generation:` sets none.
    seed: int | None = None
    # Image families (text_to_image, image_edit); text models ignore these.
    num_inference_steps: int = 28
    guidance_scale: float = 3.5       # FLUX.1-dev's distilled guidance; schnell ignores it
    true_cfg_scale: float = 1.0       # > 1 with a negative prompt: true classifier-free guidance (2 passes a step)
    negative_prompt: str | None = None
    width: int | None = None          # None: 1024 (text_to_image); the input's aspect ratio at ~1 MP (image_edit)
    height: int | None = None


@dataclass(frozen=True)
class ModelLimits:
    max_new_tokens: int = 2048
    max_prompt_chars: int = 32000
    max_images: int = 0
    max_videos: int = 0
    max_audios: int = 0
    # Image families: steps, size and count of the images a request may ask for, and how much work
    # (steps x width x height x images) one synchronous request may be; more is for an async job.
    max_steps: int = 50
    max_image_pixels: int = 2 * 1024 * 1024    # width x height of one output image
    max_images_out: int = 4
    max_sync_step_pixels: int = 128 * 1024 * 1024


@dataclass(frozen=True)
class EngineSettings:
    """How a loaded model's engine runs (server `engine:` section, overridden per model)."""
    batching: str = "auto"          # auto: continuous where the family supports it, else dynamic
    max_batch_size: int = 16        # rows in one forward pass; 1 = batching off
    max_queue: int = 64             # requests waiting per model; more get 503 + Retry-After
    queue_timeout: float = 60.0     # seconds a request may wait to start; then 503
    attn_implementation: str = "auto"  # auto = transformers' choice (sdpa where the model has it)
    static_cache: bool = False      # generate(cache_implementation="static"): fixed shapes, for GPUs
    compile: bool = False           # torch.compile the forward (needs static_cache)
    # Prefix reuse (continuous engine): the KV of recent prompts, least recently used out past this
    # many MiB, reserved in the model's bytes (its memory budget); 0 = off.
    prefix_cache_mb: int = 256


@dataclass(frozen=True)
class ModelSpec:
    key: str
    repo_id: str | None  # None: a local folder (`path`) that is never downloaded
    family: str
    path: Path  # absolute local checkpoint folder
    revision: str = "main"
    # Run the Python files of the checkpoint (auto_map in config.json); only with a pinned revision.
    trust_remote_code: bool = False
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    keep_alive: float | None = None  # seconds; None = server idle_timeout; -1 = never; 0 = after each request
    pinned: bool = False
    preload: bool = False
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    limits: ModelLimits = field(default_factory=ModelLimits)
    engine: EngineSettings = field(default_factory=EngineSettings)
    # With device auto: load on the CPU when no GPU has room even after evictions (or "none": 503).
    fallback: str = "cpu"
    # Split over devices as seed 001 did ({"cuda:0": bytes, "cpu": bytes}; accelerate's device_map="auto").
    max_memory: dict[str, int] | None = None
    # Other folders that may hold this checkpoint (seed 001's names): used when `path` has no complete one.
    also_look_in: tuple[Path, ...] = ()
    timeout: float | None = None    # seconds a request may take (its deadline); None = the server's request_timeout
    # Image families on small GPUs: "model" keeps each pipeline component on the CPU until its turn,
    # "sequential" each layer (slower, least GPU memory); CUDA only.
    offload: str = "none"
    path_note: str | None = None    # why `path` is not the configured folder, when it is not


@dataclass(frozen=True)
class MediaSettings:
    max_media_bytes: int = 32 * MIB
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 8


@dataclass(frozen=True)
class RemoteMediaSettings:
    """Fetching client media from http(s) URLs (utils/remote_media.py). Off unless turned on."""
    enabled: bool = False
    allow_hosts: tuple[str, ...] = ()      # exact names and "*.example.com" patterns; empty = any public host
    max_bytes: int = 32 * MIB              # one fetched body
    timeout: float = 10.0                  # seconds for the whole fetch: resolve, connect, redirects, read
    max_redirects: int = 3


BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RayGroup:
    """One Ray Serve deployment: the models it serves and how its replicas are placed."""
    name: str
    models: tuple[str, ...] = ()     # empty: every model no other group names
    replicas: int | None = None      # None: one per GPU of the cluster (num_gpus each), else 1
    min_replicas: int | None = None  # both set: autoscaling between them (replicas is the start)
    max_replicas: int | None = None
    num_cpus: float = 1.0            # per replica
    num_gpus: float | None = None    # per replica; None: 1 where the cluster has GPUs, else 0
    max_models_per_replica: int = 1  # serve.multiplexed's cap, and each replica's max_loaded_models


@dataclass(frozen=True)
class RaySettings:
    """`backend: ray` (utils/cluster/): the same server over Ray Serve replicas."""
    address: str | None = None       # RAY_ADDRESS: an existing cluster; None: a local instance
    num_cpus: float | None = None    # a local instance's CPUs (None: Ray's count)
    max_ongoing_requests: int = 64   # per replica, before Serve queues on the front
    health_check_period: float = 2.0  # seconds; a dead replica is replaced about this fast
    call_timeout: float = 30.0       # seconds an admin / status call to a replica may take
    app_prefix: str = "model_server_"  # RAY_APP_PREFIX: this server's Serve apps; one per front on a cluster
    groups: tuple[RayGroup, ...] = (RayGroup("default"),)

    def group_of(self, key: str) -> RayGroup:
        catch_all = None
        for group in self.groups:
            if key in group.models:
                return group
            if not group.models:
                catch_all = group
        return catch_all or self.groups[0]


@dataclass(frozen=True)
class JobSettings:
    """Asynchronous jobs (utils/jobs.py): records in SQLite and results as files under `dir`."""
    dir: Path | None = None        # JOBS_DIR; None: <models_dir>/.jobs (kept across restarts, unlike tmp/)
    workers: int = 4               # JOB_WORKERS: jobs run at once (an engine batches those of one model)
    result_ttl: float = 86400.0    # JOB_RESULT_TTL: seconds a finished job and its result are kept
    max_queued: int = 1000         # JOB_MAX_QUEUED: more submissions get 503 + Retry-After
    max_finished: int = 10000      # finished jobs kept at most (the oldest go first, before their TTL)
    max_attempts: int = 2          # JOB_MAX_ATTEMPTS: starts a job gets when the server dies while it runs
    timeout: float = 3600.0        # JOB_TIMEOUT: a job's deadline once started, unless its body sets `timeout`
    # A job's body is kept until it runs (up to max_queued of them): its own cap, under MAX_CONTENT_LENGTH_MB.
    max_body_mb: float = 32.0      # JOB_MAX_BODY_MB
    orphan_grace: float = 600.0    # JOB_ORPHAN_GRACE: seconds queued jobs wait for a model gone from the config

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)


@dataclass(frozen=True)
class RamTierSettings:
    """Parking GPU models in CPU RAM instead of dropping them (utils/ram_tier.py, README "RAM tier").
    Only models on a CUDA GPU are ever parked: on a CPU-only box this changes nothing."""
    enabled: bool = True                 # RAM_TIER
    # Bytes of parked models; None (auto): half the machine's RAM. Free RAM minus ram_headroom is
    # checked too at each demotion. Parked models do not count against ram_budget_bytes (that one
    # bounds models serving on the CPU), but they share physical RAM: a CPU load short of it drops
    # parked models first.
    max_bytes: int | None = None         # RAM_TIER_MAX_GB
    pin_memory: bool = True              # RAM_TIER_PIN_MEMORY: page-locked, so the way back is one fast copy
    # Seconds a parked model stays in RAM without a request before it is dropped for good (the sweeper
    # checks); -1 = until the tier's budget or free RAM needs its room.
    keep_alive: float = 1800.0           # RAM_TIER_KEEP_ALIVE


@dataclass(frozen=True)
class ServerSettings:
    models: dict[str, ModelSpec]
    models_dir: Path
    tmp_dir: Path
    log_dir: Path
    max_loaded_models: int = 2
    idle_timeout: float = 600.0
    max_content_length: int = 64 * MIB
    ram_budget_bytes: int | None = None
    ram_headroom_bytes: int = 2 * GIB
    gpu_budget_bytes: int | None = None
    gpu_headroom_bytes: int = 1 * GIB
    failed_load_backoff: float = 30.0
    sweep_interval: float = 5.0
    tmp_ttl: float = 3600.0
    tmp_max_bytes: int = 2 * GIB
    media: MediaSettings = field(default_factory=MediaSettings)
    remote_media: RemoteMediaSettings = field(default_factory=RemoteMediaSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    ram_tier: RamTierSettings = field(default_factory=RamTierSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)  # defaults for every model's engine
    torch_threads: int | None = None  # torch's intra-op threads; None = the cores this process may use, less one
    # A model that served within group_window seconds is not evicted for another model's load...
    # (None = auto: as long as that model's own last load took, i.e. what evicting it would cost)
    group_window: float | None = None
    max_pass_over: float = 10.0      # ...unless that load has waited this long (requests grouped by model)
    # Each sweep: while free RAM / GPU memory is below its headroom, idle models on that device are
    # released (LRU first) until free memory is back above headroom + margin.
    request_timeout: float = 600.0   # REQUEST_TIMEOUT: default deadline of a request, seconds (per model: timeout)
    profile_max_seconds: float = 60.0  # PROFILE_MAX_SECONDS: the longest POST /admin/profile?seconds=N records
    # DEFAULT_SEED (seed 004's VLM_SEED): the seed of requests that give none, for every model whose own
    # generation.seed is unset (applied to ModelSpec.generation.seed at load); None: a fresh seed each time.
    default_seed: int | None = None
    memory_pressure_release: bool = True
    pressure_margin_bytes: int = 1 * GIB
    # Quantized cache (utils/checkpoints.py): the first 4-bit / 8-bit load of a model saves the quantized
    # weights; later loads read them instead of quantizing again. LRU entries go beyond the cap.
    quant_cache: bool = True                        # QUANT_CACHE
    quant_cache_dir: Path | None = None             # QUANT_CACHE_DIR; None: <models_dir>/.quantized
    quant_cache_max_bytes: int | None = 32 * GIB    # QUANT_CACHE_MAX_GB; None (null): no cap
    admin_token: str | None = None
    api_token: str | None = None
    demo: bool = False
    backend: str = "local"           # MODEL_SERVER_BACKEND / --backend: local (one process) | ray
    ray: RaySettings = field(default_factory=RaySettings)
    config_path: Path | None = None
    # The environment these settings were read with (a config reload reads the same one again).
    env: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def jobs_path(self) -> Path:
        return self.jobs.dir or self.models_dir / ".jobs"

    @property
    def quant_cache_path(self) -> Path:
        return self.quant_cache_dir or self.models_dir / ".quantized"

    def replace(self, **changes: Any) -> "ServerSettings":
        return dataclasses.replace(self, **changes)

    def with_model(self, key: str, **changes: Any) -> "ServerSettings":
        models = dict(self.models)
        models[key] = dataclasses.replace(models[key], **changes)
        return self.replace(models=models)

    def for_demo(self, demo_dir: Path | None = None) -> "ServerSettings":
        """The five reference keys served from tiny random-weight checkpoints (utils/demo_models.py).

        Their quantization is dropped (the checkpoints are float32 and a few MB) and generation is
        capped short so the demo answers in milliseconds on a CPU. Other configured models keep
        their own settings.
        """
        from utils.demo_models import DEMO_KEYS

        root = demo_dir or (self.models_dir / "demo")
        models = dict(self.models)
        for key in DEMO_KEYS:
            if key in models:
                spec = models[key]
                generation = dataclasses.replace(spec.generation,
                                                 max_new_tokens=min(spec.generation.max_new_tokens, 16))
                if spec.family in IMAGE_FAMILIES:  # demo images are noise: small and few steps
                    generation = dataclasses.replace(
                        generation, num_inference_steps=min(generation.num_inference_steps, 4), width=64, height=64)
                models[key] = dataclasses.replace(spec, path=root / key, dtype="float32", quantization="none",
                                                  offload="none", generation=generation)
        return self.replace(models=models, demo=True)

    def public_dict(self) -> dict:
        """Settings as shown to operators: no tokens, paths relative where possible."""
        return {
            "max_loaded_models": self.max_loaded_models,
            "idle_timeout": self.idle_timeout,
            "max_content_length": self.max_content_length,
            "ram_budget_bytes": self.ram_budget_bytes,
            "ram_headroom_bytes": self.ram_headroom_bytes,
            "gpu_budget_bytes": self.gpu_budget_bytes,
            "gpu_headroom_bytes": self.gpu_headroom_bytes,
            "failed_load_backoff": self.failed_load_backoff,
            "tmp_ttl": self.tmp_ttl,
            "tmp_max_bytes": self.tmp_max_bytes,
            "media": dataclasses.asdict(self.media),
            "remote_media": dataclasses.asdict(self.remote_media),
            "jobs": {**dataclasses.asdict(self.jobs), "dir": _shown_path(self.jobs_path, self.models_dir.parent)},
            "ram_tier": dataclasses.asdict(self.ram_tier),
            "engine": dataclasses.asdict(self.engine),
            "torch_threads": self.torch_threads,
            "group_window": self.group_window,
            "max_pass_over": self.max_pass_over,
            "request_timeout": self.request_timeout,
            "profile_max_seconds": self.profile_max_seconds,
            "default_seed": self.default_seed,
            "memory_pressure_release": self.memory_pressure_release,
            "pressure_margin_bytes": self.pressure_margin_bytes,
            "quant_cache": self.quant_cache,
            "quant_cache_dir": _shown_path(self.quant_cache_path, self.models_dir),
            "quant_cache_max_bytes": self.quant_cache_max_bytes,
            "admin_auth": self.admin_token is not None,
            "api_auth": self.api_token is not None,
            "demo": self.demo,
            "backend": self.backend,
            "ray": dataclasses.asdict(self.ray) if self.backend == "ray" else None,
        }


def _shown_path(path: Path, base: Path) -> str:
    """A path as operators see it: relative to `base` when inside it, else only its last part."""
    try:
        return str(path.relative_to(base))
    except ValueError:
        return path.name


# ---------------------------------------------------------------- parsing helpers

def _fail(where: str, msg: str) -> None:
    raise ConfigError(f"{where}: {msg}")


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        _fail(where, f"expected an integer, got {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and value != number:
            raise ValueError
        if isinstance(value, str) and value.strip() != str(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: .inf
        _fail(where, f"expected an integer, got {value!r}"[:200])
    if minimum is not None and number < minimum:
        _fail(where, f"must be >= {minimum}, got {number}")
    return number


def _float(value: Any, where: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool):
        _fail(where, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        _fail(where, f"expected a number, got {value!r}"[:200])
    if number != number or number in (float("inf"), float("-inf")) or abs(number) > 1e12:
        _fail(where, f"must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        _fail(where, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        _fail(where, f"must be <= {maximum}, got {number}")
    return number


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    _fail(where, f"expected true or false, got {value!r}")
    return False


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text not in choices:
        _fail(where, f"must be one of {', '.join(choices)}; got {value!r}")
    return text


def _gib(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "auto")):
        return None
    return int(_float(value, where, minimum=0) * GIB)



def _keep_alive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    seconds = _float(value, where)
    if seconds < 0 and seconds != -1:
        _fail(where, f"must be -1 (never unload), 0 (after each request) or a positive number of seconds; got {value!r}")
    return seconds


def _mapping(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _only_known(section: Mapping, where: str, known: set[str]) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")


def _resolve(path_value: Any, base: Path, where: str) -> Path:
    if not isinstance(path_value, (str, os.PathLike)) or not str(path_value).strip():
        _fail(where, f"expected a path, got {path_value!r}")
    try:
        path = Path(os.path.expanduser(str(path_value)))
        return (path if path.is_absolute() else base / path).resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        _fail(where, f"not a usable path ({exc}): {str(path_value)[:100]!r}")


# ---------------------------------------------------------------- sections

_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationDefaults)}
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(ModelLimits)}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineSettings)}
_MODEL_FIELDS = {"repo_id", "family", "path", "revision", "trust_remote_code", "dtype", "quantization", "device",
                 "keep_alive", "pinned", "preload", "generation", "limits", "engine", "fallback", "max_memory",
                 "also_look_in", "timeout", "offload"}
_SERVER_FIELDS = {"max_loaded_models", "idle_timeout", "models_dir", "tmp_dir", "log_dir", "max_content_length_mb",
                  "ram_budget_gb", "ram_headroom_gb", "gpu_budget_gb", "gpu_headroom_gb", "failed_load_backoff",
                  "sweep_interval", "tmp_ttl", "tmp_max_mb", "media", "remote_media", "engine", "torch_threads",
                  "group_window", "max_pass_over", "memory_pressure_release", "pressure_margin_gb",
                  "request_timeout", "profile_max_seconds", "quant_cache", "quant_cache_dir", "quant_cache_max_gb", "jobs",
                  "ram_tier", "backend", "ray", "default_seed"}
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
RAM_TIER_ENV = {"RAM_TIER": "enabled", "RAM_TIER_MAX_GB": "max_gb", "RAM_TIER_PIN_MEMORY": "pin_memory",
                "RAM_TIER_KEEP_ALIVE": "keep_alive"}
_HOST_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # fullmatch
# MODEL_<KEY>_<FIELD> overrides one field of one model, e.g. MODEL_DEEPSEEK_QUANTIZATION=8bit.
MODEL_ENV_FIELDS = ("quantization", "dtype", "device", "path", "keep_alive", "pinned", "preload", "revision",
                    "fallback", "offload")


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
    return ModelLimits(**{name: _int(raw.get(name, getattr(defaults, name)), f"{where}.{name}", minimum=0)
                          for name in _LIMIT_FIELDS})


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
    if out.compile and not out.static_cache:
        _fail(f"{where}.compile", "torch.compile needs static_cache: true (fixed shapes; otherwise every "
                                  "new batch shape recompiles)")
    if out.attn_implementation == "flash_attention_2":
        import importlib.util
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
    if not raw.get("family"):
        _fail(where, "'family' is required")
    if not raw.get("repo_id") and not raw.get("path"):  # a local folder needs no Hub id
        _fail(where, "'repo_id' is required (or a local folder in 'path', which is then never downloaded)")
    generation = _generation(raw.get("generation"), f"{where}.generation")
    limits = _limits(raw.get("limits"), f"{where}.limits")
    if generation.max_new_tokens > limits.max_new_tokens:
        _fail(f"{where}.generation.max_new_tokens",
              f"default {generation.max_new_tokens} exceeds limits.max_new_tokens {limits.max_new_tokens}")
    device = str(raw.get("device", "auto")).strip().lower()
    if not _DEVICE_RE.match(device):
        _fail(f"{where}.device", f"must be auto, cpu, cuda, cuda:N or mps; got {raw.get('device')!r}")
    spec = ModelSpec(
        key=key,
        repo_id=str(raw["repo_id"]) if raw.get("repo_id") else None,
        family=_choice(raw["family"], f"{where}.family", FAMILIES),
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
    )
    _check_image_model(spec, where)
    _check_remote_code(spec, where, pinned="revision" in raw)
    return _prefer_complete_folder(spec)


# Revisions that move: remote code from one of these could change under the server between two loads.
_MOVING_REVISIONS = ("main", "master", "head")


def _check_remote_code(spec: ModelSpec, where: str, *, pinned: bool) -> None:
    """trust_remote_code runs Python from the checkpoint: only code pinned to a commit or a tag (a name
    that moves, or none, would run whatever the repo holds at the next download)."""
    if not spec.trust_remote_code:
        return
    revision = spec.revision.strip()
    if not pinned or not revision or revision.lower() in _MOVING_REVISIONS or revision.startswith("refs/heads/"):
        given = repr(revision) if pinned else "unset (the default, 'main', moves)"
        _fail(f"{where}.trust_remote_code", f"'{spec.key}' runs the checkpoint's own code: pin it with 'revision' "
                                            f"(a commit sha or a tag; the revision is {given})")


def _check_image_model(spec: ModelSpec, where: str) -> None:
    """What an image family (diffusers pipeline) can and cannot be configured with."""
    if spec.family not in IMAGE_FAMILIES:
        if spec.offload != "none":
            _fail(f"{where}.offload", f"offload is for the image families ({', '.join(IMAGE_FAMILIES)}); "
                                      f"'{spec.family}' models split with max_memory instead")
        return
    if spec.quantization != "none":
        _fail(f"{where}.quantization", f"the image families load in dtype only (none); got {spec.quantization}")
    if spec.max_memory:
        _fail(f"{where}.max_memory", "the image families do not split by max_memory; use offload: model|sequential")
    if spec.engine.batching == "continuous":
        _fail(f"{where}.engine.batching", "image models batch dynamically (auto or dynamic)")
    generation, limits = spec.generation, spec.limits
    if generation.num_inference_steps > limits.max_steps:
        _fail(f"{where}.generation.num_inference_steps",
              f"default {generation.num_inference_steps} exceeds limits.max_steps {limits.max_steps}")
    if generation.width and generation.height and generation.width * generation.height > limits.max_image_pixels:
        _fail(f"{where}.generation.width", f"default {generation.width}x{generation.height} exceeds "
                                           f"limits.max_image_pixels {limits.max_image_pixels}")
    if limits.max_images_out < 1 or limits.max_steps < 1:
        _fail(f"{where}.limits", "max_steps and max_images_out must be at least 1 for an image model")
    if spec.family == "image_edit" and limits.max_images < 1:
        _fail(f"{where}.limits.max_images", "an image_edit model takes one input image: set max_images: 1")


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _prefer_complete_folder(spec: ModelSpec) -> ModelSpec:
    """The configured folder, or else the first of `also_look_in` that holds a complete checkpoint
    (a seed-001 user's weights are found, not downloaded again)."""
    if not spec.also_look_in:
        return spec
    from utils.download_model import checkpoint_state
    if checkpoint_state(spec.path) == "downloaded":
        return spec
    for folder in spec.also_look_in:
        if folder != spec.path and checkpoint_state(folder) == "downloaded":
            note = f"serving from {folder.name}/ (seed 001's folder): {spec.path.name}/ holds no complete checkpoint"
            logging.getLogger("model_server.settings").info("%s: %s", spec.key, note)
            return dataclasses.replace(spec, path=folder, path_note=note)
    return spec


def _size(value: Any, where: str) -> int:
    """Bytes from a number of bytes or a string such as "8GiB" / "500MB" (seed 001's form)."""
    if isinstance(value, bool):
        _fail(where, f"expected a size such as 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if not 0 < value < 2**63:  # .inf and nan included
            _fail(where, f"must be a positive size, got {value!r}"[:200])
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        _fail(where, f"expected a size such as 8GiB or 500MB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


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


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "null")) \
        else value


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


def load_settings(config_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  *, demo: bool = False) -> ServerSettings:
    """Reads models.yaml (or MODELS_CONFIG / config_path) and applies environment overrides."""
    env = os.environ if env is None else env
    path = Path(config_path or env.get("MODELS_CONFIG") or DEFAULT_CONFIG).resolve()
    document = _mapping(read_document(path), path.name)  # utils/config_file.py: every read error named
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
        engine=engine,
        torch_threads=None if torch_threads in (None, "", "auto") else _int(torch_threads, "server.torch_threads",
                                                                           minimum=1),
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
    demo = demo or _bool(env.get("DEMO_MODE", "0") or "0", "DEMO_MODE")
    return settings.for_demo() if demo else settings
