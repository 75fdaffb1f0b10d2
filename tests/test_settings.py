"""models.yaml + environment -> typed settings; invalid settings fail at start with a clear message."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from utils.errors import ConfigError
from utils.config.settings import GIB, MIB, load_settings
from utils.hub.model_folder import one_snapshot, read_capabilities


def test_shipped_config_has_the_reference_models():
    settings = load_settings(env={})
    assert list(settings.models) == ["deepseek", "qwen_vl", "qwen_audio", "qwen_omni", "blip_vqa", "flux",
                                     "qwen_image_edit", "janus", "whisper", "qwen3_openvino"]
    assert settings.models["deepseek"].repo_id == "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B"
    assert settings.models["janus"].repo_id == "deepseek-community/Janus-Pro-1B"
    assert settings.models["whisper"].repo_id == "openai/whisper-large-v3-turbo"
    assert not any(s.trust_remote_code for s in settings.models.values())
    assert settings.models["flux"].repo_id == "black-forest-labs/FLUX.1-schnell"
    assert settings.models["qwen_image_edit"].repo_id == "Qwen/Qwen-Image-Edit"
    assert {s.family for s in settings.models.values()} == {"text", "vision_language", "audio", "omni", "vqa",
                                                            "text_to_image", "image_edit", "janus", "speech_to_text"}


def test_environment_overrides():
    settings = load_settings(env={"MAX_LOADED_MODELS": "3", "MODEL_IDLE_TIMEOUT": "-1", "MODELS_DIR": "/srv/m",
                                  "TMP_DIR": "/srv/t", "LOG_DIR": "/srv/l", "MAX_CONTENT_LENGTH_MB": "8",
                                  "RAM_BUDGET_GB": "12", "GPU_BUDGET_GB": "20", "ADMIN_TOKEN": "s3cret",
                                  "MODEL_DEEPSEEK_QUANTIZATION": "8bit", "MODEL_QWEN_VL_DEVICE": "cuda:1"})
    assert settings.max_loaded_models == 3 and settings.idle_timeout == -1
    assert str(settings.models_dir) == "/srv/m" and str(settings.tmp_dir) == "/srv/t"
    assert settings.models["deepseek"].path.parent == settings.models_dir
    assert settings.max_content_length == 8 * MIB
    assert settings.ram_budget_bytes == 12 * GIB and settings.gpu_budget_bytes == 20 * GIB
    assert settings.models["deepseek"].quantization == "8bit"
    assert settings.models["qwen_vl"].device == "cuda:1"
    assert settings.admin_token == "s3cret" and "s3cret" not in str(settings.public_dict())


@pytest.mark.parametrize("env,needle", [
    ({"MAX_LOADED_MODELS": "0"}, "max_loaded_models"),
    ({"MAX_LOADED_MODELS": "two"}, "max_loaded_models"),
    ({"MODEL_IDLE_TIMEOUT": "-5"}, "idle_timeout"),
    ({"RAM_BUDGET_GB": "lots"}, "ram_budget_gb"),
    ({"MODEL_DEEPSEEK_QUANTIZATION": "3bit"}, "models.deepseek.quantization"),
    ({"MODEL_DEEPSEEK_DEVICE": "tpu"}, "models.deepseek.device"),
    ({"MODEL_DEEPSEEK_KEEP_ALIVE": "-7"}, "models.deepseek.keep_alive"),
])
def test_invalid_values_name_the_key(env, needle):
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert needle in str(info.value)


@pytest.mark.parametrize("text,needle", [
    ("models: {}\n", "at least one model"),
    ("models:\n  a: {repo_id: x/y, family: painting}\n", "family"),
    ("models:\n  a: {family: text}\n", "repo_id"),
    ("models:\n  a: {repo_id: x/y, family: text, colour: red}\n", "colour"),
    ("models:\n  a: {repo_id: x/y, family: text, generation: {max_new_tokens: 99}, limits: {max_new_tokens: 10}}\n",
     "exceeds"),
    ("server: [1, 2]\nmodels: {}\n", "server"),
    ("models: [unclosed\n", "YAML"),
])
def test_invalid_files(tmp_path, text, needle):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert needle in str(info.value)


DEEP = "models:\n  a: {repo_id: x/y, family: text, generation: " + "[" * 3000 + "]" * 3000 + "}\n"
BAD_FILES = [  # (what is written: bytes, or None for a directory; what the error names)
    (b"models:\n  a: {repo_id: caf\xe9/y, family: text}\n", "models.yaml: not UTF-8"),
    (b"models:\n  a: {repo_id: x/y, family: text, limits: {max_new_tokens: .inf}}\n", "limits.max_new_tokens"),
    (b"models:\n  a: {repo_id: x/y, family: text, limits: {max_images: 1" + b"0" * 400 + b".0}}\n",
     "limits.max_images"),
    (b"server:\n  max_content_length_mb: 1" + b"0" * 400 + b"\nmodels:\n  a: {repo_id: x/y, family: text}\n",
     "max_content_length_mb"),
    (DEEP.encode(), "models.yaml: nested too deeply"),
    (None, "models.yaml: is a directory"),
    (b"models:\n  a: {repo_id: x/y, family: text}\n  a: {repo_id: x/z, family: text_to_image}\n",
     "duplicate key 'a'"),
    (b"models:\n  a:\n    repo_id: x/y\n    family: text\n    generation: {max_new_tokens: 4, max_new_tokens: 8}\n",
     "duplicate key 'max_new_tokens'"),
    (b"server: {jobs: {workers: 2}}\nserver: {}\nmodels:\n  a: {repo_id: x/y, family: text}\n",
     "duplicate key 'server'"),
]


def write_bad(tmp_path, content):
    path = tmp_path / "models.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("content,needle", BAD_FILES)
def test_files_that_cannot_be_read_name_the_problem(tmp_path, content, needle):
    path = write_bad(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert needle in message, message
    assert str(tmp_path) not in message  # the file by its name: the folders are the operator's, not a client's


@pytest.mark.parametrize("content,needle", BAD_FILES[:6])
def test_main_names_the_problem_and_exits_2_without_a_traceback(tmp_path, capsys, monkeypatch, content, needle):
    import main
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # main() would tune this test process's allocator otherwise
    assert main.main(["--config", str(write_bad(tmp_path, content))]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and needle in err and "Traceback" not in err, err


def test_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: &base {repo_id: x/y, family: text}\n  b: {<<: *base, repo_id: x/z}\n")
    settings = load_settings(path, env={})
    assert settings.models["b"].repo_id == "x/z" and settings.models["b"].family == "text"


def test_main_refuses_to_start_with_invalid_settings(tmp_path):
    done = subprocess.run([sys.executable, "main.py", "--config", str(tmp_path / "nope.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid configuration" in done.stderr and "not found" in done.stderr


@pytest.mark.parametrize("env", [{"MAX_CONTENT_LENGTH_MB": "inf"}, {"RAM_BUDGET_GB": "nan"},
                                 {"TMP_MAX_MB": "1e400"}, {"SWEEP_INTERVAL": "1e10"}])
def test_unbounded_numbers_are_config_errors(env):
    with pytest.raises(ConfigError):
        load_settings(env=env)


def write_config(tmp_path, server: str = "", model_extra: str = "") -> str:
    path = tmp_path / "models.yaml"
    path.write_text(f"server:\n  max_loaded_models: 1\n{server}\nmodels:\n  m:\n    repo_id: org/m\n    family: text\n"
                    f"{model_extra}")
    return str(path)


def test_engine_defaults_server_section_model_override_and_environment(tmp_path):
    config = write_config(tmp_path, "  engine: {max_batch_size: 4, queue_timeout: 5}",
                          "    engine: {max_queue: 3, batching: dynamic}\n")
    engine = load_settings(config, env={}).models["m"].engine
    assert (engine.max_batch_size, engine.queue_timeout, engine.max_queue, engine.batching) == (4, 5.0, 3, "dynamic")
    engine = load_settings(config, env={"MAX_BATCH_SIZE": "1", "QUEUE_TIMEOUT": "2"}).models["m"].engine
    assert (engine.max_batch_size, engine.queue_timeout, engine.max_queue) == (1, 2.0, 3)  # the model's own wins
    settings = load_settings(write_config(tmp_path), env={"TORCH_THREADS": "3", "GROUP_WINDOW": "0"})
    assert settings.torch_threads == 3 and settings.group_window == 0.0
    default = load_settings(write_config(tmp_path), env={})
    assert default.torch_threads is None and default.group_window is None and default.engine.max_batch_size == 32


def test_gil_switch_interval_defaults_short_reads_the_environment_and_python_restores_its_own(tmp_path):
    assert load_settings(write_config(tmp_path), env={}).gil_switch_interval == 0.0005
    assert load_settings(write_config(tmp_path), env={"GIL_SWITCH_INTERVAL": "0.0002"}).gil_switch_interval == 0.0002
    assert load_settings(write_config(tmp_path, "  gil_switch_interval: python"), env={}).gil_switch_interval is None
    for bad in ("0", "1", "fast"):
        with pytest.raises(ConfigError, match="server.gil_switch_interval"):
            load_settings(write_config(tmp_path), env={"GIL_SWITCH_INTERVAL": bad})


def test_the_services_set_the_processes_gil_switch_interval(make_settings):
    from utils.local_services import build_local_services
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        services = build_local_services(make_settings(GIL_SWITCH_INTERVAL="0.00025"))
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        services.manager.shutdown()
        build_local_services(make_settings(GIL_SWITCH_INTERVAL="python")).manager.shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.00025)  # python: left as it was
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("model_extra,needle", [
    ("    engine: {max_batch_size: 0}\n", "models.m.engine.max_batch_size"),
    ("    engine: {batching: magic}\n", "models.m.engine.batching"),
    ("    engine: {queue_timeout: -1}\n", "models.m.engine.queue_timeout"),
    ("    engine: {compile: true, batching: dynamic}\n", "compiles with static_cache: true only"),
    ("    engine: {compile: true}\n    trust_remote_code: true\n    revision: 0123abc\n", "models.m.engine.compile"),
    ("    engine: {attn_implementation: flash_attention_2}\n", "flash-attn"),
    ("    engine: {speed: 11}\n", "unknown key(s) speed"),
])
def test_engine_settings_that_cannot_be_honoured_stop_the_start(tmp_path, model_extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_settings(write_config(tmp_path, model_extra=model_extra), env={})


def test_remote_media_is_off_by_default_and_set_by_file_and_environment(tmp_path):
    from utils.config.settings import RemoteMediaSettings
    default = load_settings(env={})
    assert default.remote_media == RemoteMediaSettings() and default.remote_media.enabled is False
    assert default.public_dict()["remote_media"]["enabled"] is False
    config = write_config(tmp_path, "  remote_media: {enabled: true, allow_hosts: [Media.Example.com., '*.cdn.org'],"
                                    " max_mb: 1, timeout: 3, max_redirects: 0}")
    remote = load_settings(config, env={}).remote_media
    assert remote == RemoteMediaSettings(enabled=True, allow_hosts=("media.example.com", "*.cdn.org"),
                                         max_bytes=1 * MIB, timeout=3.0, max_redirects=0)
    remote = load_settings(config, env={"REMOTE_MEDIA": "0", "REMOTE_MEDIA_ALLOW_HOSTS": "a.org, *.b.net,[::1]",
                                        "REMOTE_MEDIA_MAX_MB": "0.5", "REMOTE_MEDIA_TIMEOUT": "2.5"}).remote_media
    assert remote == RemoteMediaSettings(enabled=False, allow_hosts=("a.org", "*.b.net", "::1"),
                                         max_bytes=MIB // 2, timeout=2.5, max_redirects=0)
    remote = load_settings(env={"REMOTE_MEDIA": "yes"}).remote_media
    assert remote.enabled and remote.allow_hosts == () and remote.max_bytes == RemoteMediaSettings.max_bytes


def test_ram_tier_defaults_file_and_environment(tmp_path):
    from utils.config.settings import RamTierSettings
    default = load_settings(env={})
    assert default.ram_tier == RamTierSettings() and default.ram_tier.enabled and default.ram_tier.max_bytes is None
    assert default.public_dict()["ram_tier"]["pin_memory"] is True
    config = write_config(tmp_path, "  ram_tier: {enabled: true, max_gb: 24, pin_memory: false, keep_alive: -1}")
    assert load_settings(config, env={}).ram_tier == RamTierSettings(max_bytes=24 * GIB, pin_memory=False,
                                                                     keep_alive=-1)
    tier = load_settings(config, env={"RAM_TIER": "0", "RAM_TIER_MAX_GB": "auto", "RAM_TIER_PIN_MEMORY": "1",
                                      "RAM_TIER_KEEP_ALIVE": "60"}).ram_tier
    assert tier == RamTierSettings(enabled=False, max_bytes=None, pin_memory=True, keep_alive=60.0)


@pytest.mark.parametrize("server,needle", [
    ("  ram_tier: {enabled: maybe}", "server.ram_tier.enabled"),
    ("  ram_tier: {max_gb: -1}", "server.ram_tier.max_gb"),
    ("  ram_tier: {keep_alive: -5}", "server.ram_tier.keep_alive"),
    ("  ram_tier: {budget: 3}", "server.ram_tier: unknown key"),
])
def test_bad_ram_tier_settings_name_the_key(tmp_path, server, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(write_config(tmp_path, server), env={})


@pytest.mark.parametrize("env,needle", [
    ({"REMOTE_MEDIA": "maybe"}, "server.remote_media.enabled"),
    ({"REMOTE_MEDIA_MAX_MB": "0"}, "server.remote_media.max_mb"),
    ({"REMOTE_MEDIA_MAX_MB": "lots"}, "server.remote_media.max_mb"),
    ({"REMOTE_MEDIA_TIMEOUT": "-1"}, "server.remote_media.timeout"),
    ({"REMOTE_MEDIA_TIMEOUT": "inf"}, "server.remote_media.timeout"),
    ({"REMOTE_MEDIA_ALLOW_HOSTS": "good.org,bad host"}, "server.remote_media.allow_hosts"),
    ({"REMOTE_MEDIA_ALLOW_HOSTS": "*"}, "server.remote_media.allow_hosts"),
    ({"REMOTE_MEDIA_ALLOW_HOSTS": "a.*.org"}, "server.remote_media.allow_hosts"),
    ({"REMOTE_MEDIA_ALLOW_HOSTS": "http://a.org/"}, "server.remote_media.allow_hosts"),
])
def test_invalid_remote_media_values_name_the_key(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(env=env)


@pytest.mark.parametrize("section,needle", [
    ("  remote_media: {max_redirects: -1}", "server.remote_media.max_redirects"),
    ("  remote_media: {max_redirects: two}", "server.remote_media.max_redirects"),
    ("  remote_media: {allow_hosts: {a: 1}}", "server.remote_media.allow_hosts"),
    ("  remote_media: {allow_hosts: [1.5]}", "server.remote_media.allow_hosts"),
    ("  remote_media: {proxy: x}", "unknown key"),
    ("  remote_media: [1]", "server.remote_media"),
])
def test_invalid_remote_media_sections(tmp_path, section, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(write_config(tmp_path, section), env={})


def test_small_gpu_settings_fallback_max_memory_and_mps(tmp_path):
    config = write_config(tmp_path, model_extra="    device: mps\n    fallback: none\n"
                                                "    max_memory: {0: 8GiB, cpu: 32GiB, 'cuda:1': 500MB}\n")
    spec = load_settings(config, env={}).models["m"]
    assert spec.device == "mps" and spec.fallback == "none"
    assert spec.max_memory == {"cuda:0": 8 * GIB, "cuda:1": 500 * 10**6, "cpu": 32 * GIB}  # GPUs first
    default = load_settings(write_config(tmp_path), env={}).models["m"]
    assert default.fallback == "cpu" and default.max_memory is None


@pytest.mark.parametrize("model_extra,needle", [
    ("    max_memory: {0: lots}\n", "models.m.max_memory.0"),
    ("    max_memory: {tpu: 8GiB}\n", "models.m.max_memory.tpu"),
    ("    max_memory: {}\n", "models.m.max_memory"),
    ("    fallback: gpu\n", "models.m.fallback"),
    ("    device: xpu\n", "models.m.device"),
])
def test_small_gpu_settings_that_make_no_sense_stop_the_start(tmp_path, model_extra, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(write_config(tmp_path, model_extra=model_extra), env={})


def test_seed_001_folder_is_used_when_the_configured_one_holds_no_checkpoint(tmp_path, models_dir):
    import shutil
    root = tmp_path / "models"
    root.mkdir()
    config = tmp_path / "models.yaml"
    config.write_text("server:\n  models_dir: models\nmodels:\n  deepseek:\n    repo_id: org/m\n    family: text\n"
                      "    path: deepseek-r1-0528-qwen3-8b\n    also_look_in: [deepseek-8b]\n")
    assert load_settings(config, env={}).models["deepseek"].path == root / "deepseek-r1-0528-qwen3-8b"  # none
    shutil.copytree(models_dir / "demo" / "deepseek", root / "deepseek-8b")
    spec = load_settings(config, env={}).models["deepseek"]
    assert spec.path == root / "deepseek-8b" and "seed 001" in spec.path_note
    (root / "deepseek-r1-0528-qwen3-8b").mkdir()                     # an empty or partial folder: still seed 001's
    (root / "deepseek-r1-0528-qwen3-8b" / "config.json").write_text("{}")
    assert load_settings(config, env={}).models["deepseek"].path == root / "deepseek-8b"
    shutil.rmtree(root / "deepseek-r1-0528-qwen3-8b")
    shutil.copytree(models_dir / "demo" / "deepseek", root / "deepseek-r1-0528-qwen3-8b")
    spec = load_settings(config, env={}).models["deepseek"]           # a complete configured folder wins
    assert spec.path == root / "deepseek-r1-0528-qwen3-8b" and spec.path_note is None


def test_a_seed_001_folder_serves_and_says_so(tmp_path, models_dir):
    import shutil

    from tests.conftest import make_app
    root = tmp_path / "models"
    shutil.copytree(models_dir / "demo" / "blip_vqa", root / "legacy-blip")
    config = tmp_path / "models.yaml"
    config.write_text("server:\n  models_dir: models\n  ram_headroom_gb: 0\nmodels:\n  blip:\n    repo_id: org/b\n"
                      "    family: vqa\n    path: blip-new\n    also_look_in: [legacy-blip]\n    limits: {max_images: 1}\n")
    settings = load_settings(config, env={"TMP_DIR": str(tmp_path / "tmp"), "LOG_DIR": str(tmp_path / "logs")})
    client = make_app(settings).test_client()
    from tests import media_samples as ms
    answer = client.post("/generate/blip", json={"prompt": "color?", "image": ms.b64(ms.png()), "max_new_tokens": 2})
    assert answer.status_code == 200, answer.get_json()
    status = client.get("/admin/model_status").get_json()["models"]["blip"]
    assert "legacy-blip" in status["path_note"]


def test_ray_replicas_lie_between_min_and_max_and_the_app_prefix_is_a_setting(tmp_path):
    with pytest.raises(ConfigError, match="server.ray.groups.default.replicas"):
        load_settings(write_config(tmp_path, "  ray: {min_replicas: 1, max_replicas: 2, replicas: 3}"), env={})
    ray = load_settings(write_config(tmp_path, "  ray: {min_replicas: 1, max_replicas: 3, replicas: 2}"), env={}).ray
    assert ray.groups[0].replicas == 2 and ray.app_prefix == "model_server_"
    assert load_settings(write_config(tmp_path), env={"RAY_APP_PREFIX": "front_b_"}).ray.app_prefix == "front_b_"
    with pytest.raises(ConfigError, match="server.ray.app_prefix"):
        load_settings(write_config(tmp_path), env={"RAY_APP_PREFIX": "a b"})


def test_a_replica_gets_only_the_environment_settings_read():
    from utils.config.settings import settings_env
    env = {"HF_TOKEN": "secret", "ADMIN_TOKEN": "a", "API_TOKEN": "b", "AWS_SECRET_ACCESS_KEY": "x",
           "MAX_BATCH_SIZE": "4", "MODEL_DEEPSEEK_QUANTIZATION": "8bit", "RAY_REPLICAS": "2", "DEMO_MODE": "1",
           "MODELS_CONFIG": "/c.yaml", "MODEL_SERVER_BACKEND": "ray", "RAM_TIER": "1"}
    assert settings_env(env) == {k: v for k, v in env.items() if "TOKEN" not in k and "SECRET" not in k}


def test_a_request_snapshot_reads_a_model_folder_once_and_a_missing_one_each_time(tmp_path):
    """utils/hub/model_folder.one_snapshot (one HTTP request): a folder's files are stat'ed once inside
    it, so a change shows from the next snapshot on; a folder not there yet is looked at each time."""
    folder = tmp_path / "m"
    with one_snapshot():
        assert read_capabilities(folder) is None
        folder.mkdir()
        (folder / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}')
        first = read_capabilities(folder)  # the download landed meanwhile: seen at once
        assert first is not None and first.media == frozenset()
        (folder / "preprocessor_config.json").write_text("{}")
        (folder / "config.json").write_text('{"architectures": ["Qwen2VLForConditionalGeneration"], '
                                            '"model_type": "qwen2_vl"}')
        assert read_capabilities(folder) == first  # the same snapshot within one request
    assert read_capabilities(folder) != first  # the next request sees the change
