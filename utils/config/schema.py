"""The settings' schema: typed, frozen dataclasses (ServerSettings and its sections) and the choices
each field may take. Loading from models.yaml + environment is utils/config/settings.py; the value
parsers it validates with are utils/config/validation.py. Each default is stated once, here."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

GIB = 2**30
MIB = 2**20
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "models.yaml"

FAMILIES = ("text", "vision_language", "vqa", "audio", "omni", "text_to_image", "image_edit", "janus",
            "speech_to_text")
IMAGE_FAMILIES = ("text_to_image", "image_edit")  # diffusers pipelines: images out (utils/families/diffusion.py)
OFFLOADS = ("none", "model", "sequential")        # image families on small GPUs (CUDA only)
IMAGE_SIZE_MULTIPLE = 16                         # FLUX and Qwen-Image: VAE factor 8 x 2x2 latent patches
QUANTIZATIONS = ("none", "4bit", "8bit")
RUNTIMES = ("pytorch", "openvino")                # how a model runs (utils/runtimes/; docs/openvino.md)
# OpenVINO weight compression at export (optimum-intel / nncf); fp32 keeps the weights as they are.
WEIGHT_FORMATS = ("int4", "int8", "fp16", "fp32")
OPENVINO_FAMILIES = ("text",)                     # families an OpenVINO runtime can serve
_OPENVINO_DEVICE_RE = re.compile(r"^(auto|cpu|gpu(\.\d+)?)$")  # gpu: an Intel GPU OpenVINO sees
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING = ("auto", "continuous", "dynamic")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FALLBACKS = ("cpu", "none")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# The models.yaml keys demo mode serves from tiny random-weight checkpoints (utils/hub/demo_models.py
# builds one for each of these keys).
DEMO_KEYS = ("deepseek", "qwen_vl", "blip_vqa", "qwen_audio", "qwen_omni", "flux", "qwen_image_edit", "janus",
             "whisper", "qwen3_openvino")
# `--demo all`: the architecture matrix served beside them (utils/hub/demo_matrix.py builds one checkpoint
# per key): key -> (the real repo it stands for, the family its config maps to; tests/test_matrix.py
# checks the family read from each built folder agrees).
DEMO_MATRIX = {
    "llama": ("meta-llama/Llama-3.2-1B-Instruct", "text"),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.3", "text"),
    "gemma2": ("google/gemma-2-2b-it", "text"),
    "phi3": ("microsoft/Phi-3.5-mini-instruct", "text"),
    "granite": ("ibm-granite/granite-3.1-2b-instruct", "text"),
    "qwen2_vl": ("Qwen/Qwen2-VL-2B-Instruct", "vision_language"),
    "llava": ("llava-hf/llava-1.5-7b-hf", "vision_language"),
    "llava_onevision": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "vision_language"),
    "gemma3": ("google/gemma-3-4b-it", "vision_language"),
    "smolvlm": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "vision_language"),
    "idefics3": ("HuggingFaceM4/Idefics3-8B-Llama3", "vision_language"),
    "internvl": ("OpenGVLab/InternVL3-1B-hf", "vision_language"),
    "paligemma": ("google/paligemma-3b-mix-224", "vqa"),
}
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
    # Media items per request; None: what the checkpoint takes (utils/hub/model_folder.py read_capabilities),
    # else DEFAULT_MEDIA_LIMITS there. 0 refuses the kind.
    max_images: int | None = None
    max_videos: int | None = None
    max_audios: int | None = None
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
    max_batch_size: int = 32        # rows in one forward pass; 1 = batching off (out of memory halves it for a while)
    max_queue: int = 64             # requests waiting per model; more get 503 + Retry-After
    queue_timeout: float = 60.0     # seconds a request may wait to start; then 503
    attn_implementation: str = "auto"  # auto = transformers' choice (sdpa where the model has it)
    static_cache: bool = False      # generate(cache_implementation="static"): fixed shapes, for GPUs
    # torch.compile: with static_cache, generate's forward (CUDA); without, the continuous engine's
    # decode step (dynamic shapes, any device; compiled at load, so the load takes longer)
    compile: bool = False
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
    # pytorch: transformers in this process; openvino: an IR exported once (utils/runtimes/) served by
    # openvino-genai. weight_format is the openvino export's weight compression (pytorch uses quantization).
    runtime: str = "pytorch"
    weight_format: str = "int4"


@dataclass(frozen=True)
class MediaSettings:
    max_media_bytes: int = 32 * MIB
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 8


@dataclass(frozen=True)
class RemoteMediaSettings:
    """Fetching client media from http(s) URLs (utils/media/remote.py). Off unless turned on."""
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
    """Asynchronous jobs (utils/jobs/runner.py): records in SQLite and results as files under `dir` (utils/jobs/store.py)."""
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
    """Parking GPU models in CPU RAM instead of dropping them (utils/serving/ram_tier.py, docs/memory.md "RAM tier (GPU)").
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
class OpenVINOSettings:
    """Server `openvino:` section: where exports are kept and the exporter's own environment."""
    cache_dir: Path | None = None            # OPENVINO_CACHE_DIR; None: <models_dir>/.openvino
    cache_max_bytes: int | None = 32 * GIB   # OPENVINO_CACHE_MAX_GB; None (null): no cap
    # The exporter (optimum-intel) needs an older transformers than the server: it runs from its own
    # virtual environment, built here on first use (pinned versions, utils/runtimes/exporter.py).
    exporter_dir: Path | None = None         # OPENVINO_EXPORTER_DIR; None: <models_dir>/.openvino-exporter
    export_timeout: float = 3600.0           # seconds one export may take


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
    # GIL_SWITCH_INTERVAL: seconds a thread holding the GIL keeps it while another waits (sys.setswitchinterval).
    # torch gives the GIL up around every operator, so the engine thread takes it back hundreds of times a step,
    # each time waiting out a busy request thread's interval: Python's 5 ms made a decode step beside busy
    # request threads ~1000x slower than alone (docs/engine_speed.md). None: Python's own.
    gil_switch_interval: float | None = 0.0005
    # Grouping (utils/serving/grouping.py): None = auto, an idle model is spared from another model's load
    # only while it is in demand; a number = one that served within that many seconds is spared; 0 = off...
    group_window: float | None = None
    max_pass_over: float = 10.0      # ...and no load waits longer than this (requests grouped by model)
    # Each sweep: while free RAM / GPU memory is below its headroom, idle models on that device are
    # released (LRU first) until free memory is back above headroom + margin.
    request_timeout: float = 600.0   # REQUEST_TIMEOUT: default deadline of a request, seconds (per model: timeout)
    profile_max_seconds: float = 60.0  # PROFILE_MAX_SECONDS: the longest POST /admin/profile?seconds=N records
    # DEFAULT_SEED (seed 004's VLM_SEED): the seed of requests that give none, for every model whose own
    # generation.seed is unset (applied to ModelSpec.generation.seed at load); None: a fresh seed each time.
    default_seed: int | None = None
    memory_pressure_release: bool = True
    pressure_margin_bytes: int = 1 * GIB
    # Quantized cache (utils/serving/quantized_cache.py): the first 4-bit / 8-bit load of a model saves the quantized
    # weights; later loads read them instead of quantizing again. LRU entries go beyond the cap.
    quant_cache: bool = True                        # QUANT_CACHE
    quant_cache_dir: Path | None = None             # QUANT_CACHE_DIR; None: <models_dir>/.quantized
    quant_cache_max_bytes: int | None = 32 * GIB    # QUANT_CACHE_MAX_GB; None (null): no cap
    openvino: OpenVINOSettings = field(default_factory=OpenVINOSettings)
    admin_token: str | None = None
    api_token: str | None = None
    demo: bool = False
    demo_matrix: bool = False  # `--demo all`: the architecture matrix (DEMO_MATRIX) served too
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

    @property
    def openvino_cache_path(self) -> Path:
        return self.openvino.cache_dir or self.models_dir / ".openvino"

    @property
    def openvino_exporter_path(self) -> Path:
        return self.openvino.exporter_dir or self.models_dir / ".openvino-exporter"

    def replace(self, **changes: Any) -> "ServerSettings":
        return dataclasses.replace(self, **changes)

    def with_model(self, key: str, **changes: Any) -> "ServerSettings":
        models = dict(self.models)
        models[key] = dataclasses.replace(models[key], **changes)
        return self.replace(models=models)

    def for_demo(self, demo_dir: Path | None = None, *, matrix: bool = False) -> "ServerSettings":
        """The five reference keys served from tiny random-weight checkpoints (utils/hub/demo_models.py).

        Their quantization is dropped (the checkpoints are float32 and a few MB) and generation is
        capped short so the demo answers in milliseconds on a CPU. Other configured models keep
        their own settings. `matrix`: the architecture matrix (DEMO_MATRIX) is added, each model under
        its key; media and limits come from its checkpoint folder.
        """
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
                                                  offload="none", generation=generation,
                                                  weight_format="fp32" if spec.runtime == "openvino" else
                                                  spec.weight_format)
        if matrix:
            for key, (repo_id, family) in DEMO_MATRIX.items():
                models.setdefault(key, ModelSpec(
                    key=key, repo_id=repo_id, family=family, path=root / key, dtype="float32",
                    generation=GenerationDefaults(max_new_tokens=16, do_sample=False, seed=self.default_seed),
                    limits=ModelLimits(max_new_tokens=256, max_prompt_chars=8000), engine=self.engine))
        return self.replace(models=models, demo=True, demo_matrix=matrix)

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
            "gil_switch_interval": self.gil_switch_interval,
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
            "openvino": {"cache_dir": _shown_path(self.openvino_cache_path, self.models_dir),
                         "cache_max_bytes": self.openvino.cache_max_bytes,
                         "exporter_dir": _shown_path(self.openvino_exporter_path, self.models_dir),
                         "export_timeout": self.openvino.export_timeout},
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
