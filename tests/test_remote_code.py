"""trust_remote_code: a checkpoint whose architecture lives in its own Python files (auto_map in
config.json, configuration_*.py and modeling_*.py in the folder) runs only when its model sets
trust_remote_code and pins a revision; then it loads through the Auto classes and answers through
/generate, batched in its engine like any text model. The architecture (tests/remote_code/) is one
transformers does not know, so only the folder's code can load it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_app, test_env as env_for
from utils.config.settings import load_settings
from utils.engine import Engine
from utils.errors import ConfigError
from utils.families import GenerationParams, GenerationRequest, load_family
from utils.hub.download import select_files

SHA = "0123456789abcdef0123456789abcdef01234567"
GREEDY = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0, do_sample=False)


def build_checkpoint(target: Path, tokenizer_dir: Path) -> None:
    """The custom classes saved the way a remote-code repo is made: register_for_auto_class, so
    save_pretrained writes auto_map and copies the two .py files next to the weights."""
    import torch
    from transformers import AutoTokenizer

    from tests.remote_code.configuration_tiny_remote import TinyRemoteConfig
    from tests.remote_code.modeling_tiny_remote import TinyRemoteForCausalLM
    from utils.hub.demo_parts import _keep_only_word_logits

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    TinyRemoteConfig.register_for_auto_class()
    TinyRemoteForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = TinyRemoteConfig(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, logit_scale=3.0,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = TinyRemoteForCausalLM(config)
    _keep_only_word_logits(model.lm_head, tokenizer)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def write_config(path: Path, folder: Path, **models: dict) -> Path:
    """models.yaml with each model a text model on `folder` plus its own fields."""
    import yaml
    entries = {key: {"repo_id": "test/tiny-remote", "family": "text", "path": str(folder),
                     "generation": {"max_new_tokens": 6}, **fields} for key, fields in models.items()}
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


@pytest.fixture(scope="module")
def checkpoint(models_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    build_checkpoint(folder, models_dir / "demo" / "deepseek")
    return folder


@pytest.fixture(scope="module")
def settings(checkpoint, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote-run")
    config = write_config(tmp / "models.yaml", checkpoint, tiny_remote={"revision": SHA, "trust_remote_code": True},
                          untrusted={})
    return load_settings(config, env=env_for(models_dir, tmp))


def test_the_checkpoint_carries_its_own_code(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {"configuration_tiny_remote.py", "modeling_tiny_remote.py", "config.json"} <= files
    import json
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "tiny_remote"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny_remote.TinyRemoteForCausalLM"


@pytest.mark.parametrize("fields,named", [
    ({"trust_remote_code": True}, "unset"),
    ({"trust_remote_code": True, "revision": "main"}, "'main'"),
    ({"trust_remote_code": True, "revision": "refs/heads/dev"}, "'refs/heads/dev'"),
    ({"trust_remote_code": "maybe"}, "true or false"),
])
def test_remote_code_without_a_pinned_revision_is_refused_at_start(tmp_path, checkpoint, fields, named):
    config = write_config(tmp_path / "models.yaml", checkpoint, custom=fields)
    with pytest.raises(ConfigError) as refused:
        load_settings(config, env={})
    assert "models.custom.trust_remote_code" in str(refused.value) and named in str(refused.value)


def test_off_by_default_and_pinned_to_a_sha_or_a_tag(tmp_path, checkpoint):
    config = write_config(tmp_path / "models.yaml", checkpoint, custom={})
    assert load_settings(config, env={}).models["custom"].trust_remote_code is False
    write_config(config, checkpoint, custom={"trust_remote_code": True, "revision": "v1.0"})
    assert load_settings(config, env={}).models["custom"].trust_remote_code is True


def test_it_loads_the_folder_code_and_answers_through_generate(settings):
    app = make_app(settings)
    try:
        client = app.test_client()
        response = client.post("/generate/tiny_remote", json={"prompt": "hello there", "temperature": 0})
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["response"] and response.get_json()["usage"]["completion_tokens"] == 6
        served = app.extensions["model_server"].manager.snapshot()["tiny_remote"]
        assert served["state"] == "loaded" and served["engine"]["kind"] == "dynamic"  # no continuous batching
        refused = client.post("/generate/untrusted", json={"prompt": "hello there"})
        assert refused.status_code == 503 and "trust_remote_code: true" in refused.get_json()["details"]
        status = app.extensions["model_server"].manager.snapshot()["untrusted"]
        assert status["state"] == "error" and "trust_remote_code" in status["error"]
    finally:
        app.extensions["model_server"].manager.shutdown()


def test_concurrent_requests_equal_their_solo_answers(settings):
    adapter = load_family(settings.models["tiny_remote"], "cpu")
    try:
        assert type(adapter.model).__name__ == "TinyRemoteForCausalLM"
        assert type(adapter.model).__module__.startswith("transformers_modules.")  # the folder's copy ran
        assert adapter.model.config.logit_scale == 3.0
        prompts = ["hello", "the cat sat on the mat", "a b c", "what is the answer to this question", "red blue"]
        prepared = [adapter.prepare(GenerationRequest(prompt=p)) for p in prompts]
        solo = [adapter.generate(p, GREEDY).text for p in prepared]
        assert len(set(solo)) > 2
        engine = Engine(adapter, key="tiny_remote", max_batch_size=8, max_queue=16, queue_timeout=60.0)
        jobs = [engine.submit(p, GREEDY) for p in prepared]
        engine.start()
        try:
            assert [engine.run(job).text for job in jobs] == solo
        finally:
            engine.stop()
        assert engine.stats()["peak_batch"] == len(prompts)
    finally:
        adapter.release()


def test_downloads_fetch_python_files_only_for_remote_code_models():
    names = ["config.json", "model.safetensors", "modeling_tiny_remote.py", "configuration_tiny_remote.py",
             "tokenizer.json", "setup.py"]
    assert not any(n.endswith(".py") for n in select_files(names).files)
    assert {"modeling_tiny_remote.py", "configuration_tiny_remote.py"} <= set(select_files(names, code=True).files)
