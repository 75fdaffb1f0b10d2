"""Image generation (FLUX, text_to_image) and editing (Qwen-Image-Edit, image_edit) on the tiny demo
pipelines: the real diffusers pipelines with random weights, no stand-ins for a pipeline call. In
process where simpler; the HTTP parts (/generate, /v1/images through the official openai client,
batching of concurrent requests, LRU eviction) through a real server process."""
from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from tests import media_samples as ms
from utils.hub.download import checkpoint_state, select_files
from utils.engine import Engine
from utils.errors import ConfigError
from utils.families import GenerationRequest, load_family
from utils.families.diffusion import ImageParams
from utils.families.image_edit import ImageEditFamily
from utils.serving.memory import estimate_model_bytes
from utils.config.settings import load_settings

# Batched rows run the same math over a bigger matrix; CPU GEMM kernels may round the last bit
# differently, which can move a pixel by one level of 255. Different seeds differ by ~50 levels.
PIXEL_TOLERANCE = 2


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(int)


def b64_pixels(text: str) -> np.ndarray:
    return pixels(base64.b64decode(text))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= PIXEL_TOLERANCE


def photo(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def params(**changes) -> ImageParams:
    base = ImageParams(num_inference_steps=4, guidance_scale=0.0, true_cfg_scale=1.0, width=64, height=48,
                       num_images=1, seed=0)
    return replace(base, **changes)


# ------------------------------------------------------------------ in process: families and engine

@pytest.fixture(scope="module")
def settings(make_settings):
    return make_settings()


@pytest.fixture(scope="module")
def flux(settings):
    adapter = load_family(settings.models["flux"], "cpu")
    yield adapter
    adapter.release()


@pytest.fixture(scope="module")
def editor(settings):
    adapter = load_family(settings.models["qwen_image_edit"], "cpu")
    yield adapter
    adapter.release()


def run_batched(adapter, rows):
    """Every (prepared, params) submitted before the worker starts: the first batch takes them all."""
    engine = Engine(adapter, key=adapter.spec.key, max_batch_size=16, max_queue=64, queue_timeout=60.0)
    jobs = [engine.submit(prepared, p) for prepared, p in rows]
    engine.start()
    results = [job.wait() for job in jobs]
    stats = engine.stats()
    engine.stop()
    return results, stats


def test_batched_text_to_image_rows_equal_their_solo_runs(flux):
    prompts = ["a red cat", "a blue dog on a hill", "two green birds", "the sea at night under the moon"]
    rows = [(flux.prepare(GenerationRequest(prompt=p)), params(seed=100 + i, num_images=1 + i % 2))
            for i, p in enumerate(prompts)]
    solo = [flux.generate(prepared, p) for prepared, p in rows]
    batched, stats = run_batched(flux, rows)
    assert stats["batches"] == 1 and stats["rows"] == 4  # one pipeline call for all of them
    for alone, together, (_, p) in zip(solo, batched, rows):
        assert len(together.images) == p.num_images == len(alone.images)
        for a, b in zip(alone.images, together.images):
            assert close(pixels(a), pixels(b))
            assert pixels(b).shape == (48, 64, 3)
    first, second = pixels(solo[0].images[0]), pixels(solo[1].images[0])
    assert np.abs(first - second).mean() > 10  # answers are not handed to the wrong row


def test_rows_that_cannot_share_a_call_run_apart(flux):
    rows = [(flux.prepare(GenerationRequest(prompt="a cat")), params(seed=1)),
            (flux.prepare(GenerationRequest(prompt="a cat")), params(seed=1, width=80)),
            (flux.prepare(GenerationRequest(prompt="a cat")), params(seed=1, num_inference_steps=3))]
    results, stats = run_batched(flux, rows)
    assert stats["batches"] == 3
    assert [pixels(r.images[0]).shape for r in results] == [(48, 64, 3), (48, 80, 3), (48, 64, 3)]


def test_batched_edits_equal_their_solo_runs(editor):
    requests_ = [GenerationRequest(prompt="make it red", images=[Image.open(io.BytesIO(photo(64, 48, 1)))],
                                   negative_prompt=" "),
                 GenerationRequest(prompt="turn the sky into a sunset please", negative_prompt=" ",
                                   images=[Image.open(io.BytesIO(photo(128, 96, 2))).convert("RGB")])]
    rows = [(editor.prepare(r), params(seed=7 + i, width=48, height=48, true_cfg_scale=4.0, cfg=True,
                                       num_inference_steps=2)) for i, r in enumerate(requests_)]
    solo = [editor.generate(prepared, p) for prepared, p in rows]
    batched, stats = run_batched(editor, rows)
    assert stats["batches"] == 1
    for alone, together in zip(solo, batched):
        assert close(pixels(alone.images[0]), pixels(together.images[0]))
        assert pixels(together.images[0]).shape == (48, 48, 3)


def test_a_cancelled_row_stops_between_steps_and_reports_progress(flux, monkeypatch):
    """Four images of one row: once it is cancelled no step runs, and neither does the VAE decode of
    its latents (before, the pipeline still decoded all four: ~4 s on the demo at 1024x1024)."""
    decodes, decode = [], flux.model.vae.decode
    monkeypatch.setattr(flux.model.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    engine = Engine(flux, key="flux", max_batch_size=4, max_queue=8, queue_timeout=60.0).start()
    try:
        prepared = flux.prepare(GenerationRequest(prompt="a long one"))
        job = engine.submit(prepared, params(num_inference_steps=16, width=1024, height=1024, num_images=4))
        assert _wait(lambda: job.step is not None)
        job.cancel()
        result = job.wait()
        assert result.finish_reason == "cancelled" and result.images is None
        assert job.step[0] < 16 and job.step[1] == 16
        done = engine.submit(prepared, params(num_inference_steps=3))
        assert len(done.wait().images) == 1 and done.step == (3, 3)  # the model serves on
        assert decodes == [1]  # the next request's image only
    finally:
        engine.stop()


def test_edit_default_size_follows_the_input_image():
    wide = GenerationRequest(prompt="x", images=[Image.new("RGB", (200, 100))])
    assert ImageEditFamily.default_output_size(wide, 2 * 1024 * 1024) == (1440, 720)
    width, height = ImageEditFamily.default_output_size(wide, 256 * 256)
    assert width * height <= 256 * 256 and width % 16 == 0 and height % 16 == 0 and width == 2 * height


def test_offload_refuses_the_cpu_with_a_clear_error(settings):
    spec = replace(settings.models["flux"], offload="model")
    with pytest.raises(ValueError, match="offload: model .* loads on cpu"):
        load_family(spec, "cpu")


def test_a_pipeline_with_a_missing_weight_is_a_failed_load(settings, tmp_path):
    """diffusers leaves a weight missing from the files on the meta device (and says it initialized
    it): the post-load check turns that into a failed load naming the component."""
    from safetensors.torch import load_file, save_file
    from utils.families.loading import BrokenWeights

    folder = tmp_path / "flux"
    shutil.copytree(settings.models["flux"].path, folder)
    weights_file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    del weights["norm_out.linear.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(BrokenWeights, match="transformer: 1 weight.* meta device.*norm_out.linear.weight"):
        load_family(replace(settings.models["flux"], path=folder), "cpu")


# ------------------------------------------------------------------ checkpoints, estimates, settings

def test_the_estimate_counts_every_pipeline_component(settings):
    spec = settings.models["flux"]
    weights = sum(p.stat().st_size for p in spec.path.glob("*/*.safetensors"))
    assert {p.parent.name for p in spec.path.glob("*/*.safetensors")} == {"transformer", "vae", "text_encoder",
                                                                          "text_encoder_2"}
    whole = estimate_model_bytes(spec)
    assert weights <= whole <= 1.2 * weights  # float32 weights as stored, plus the load overhead
    assert estimate_model_bytes(replace(spec, offload="model")) < whole  # one component on the GPU at a time
    assert estimate_model_bytes(replace(spec, offload="sequential")) < estimate_model_bytes(replace(spec,
                                                                                                   offload="model"))


def test_pipeline_folders_are_complete_or_partial(settings, tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(settings.models["flux"].path, folder)
    assert checkpoint_state(folder) == "downloaded"
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert checkpoint_state(folder) == "partial"


def test_the_downloader_fetches_the_pipeline_folders_and_skips_single_file_copies():
    repo = ["model_index.json", "flux1-schnell.safetensors", "ae.safetensors", "README.md", "schnell_grid.jpeg",
            "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
            "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
            "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
            "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors"]
    chosen = set(select_files(repo).files)
    assert not {"flux1-schnell.safetensors", "ae.safetensors", "README.md", "schnell_grid.jpeg"} & chosen
    assert chosen == set(repo) - {"flux1-schnell.safetensors", "ae.safetensors", "README.md", "schnell_grid.jpeg"}


def test_a_pipeline_downloads_from_a_hub_and_serves(settings, tmp_path):
    """The downloader against tests/hub_server.py (the real huggingface_hub client): every component
    folder fetched, the top-level single-file copy not, and the folder then loads and renders."""
    from tests.test_download_model import run_download, start_hub

    repo = tmp_path / "repo"
    shutil.copytree(settings.models["flux"].path, repo, ignore=shutil.ignore_patterns(".demo_checkpoint"))
    (repo / "flux1-schnell.safetensors").write_bytes((repo / "transformer" / "diffusion_pytorch_model.safetensors")
                                                     .read_bytes())
    (repo / "README.md").write_text("# tiny flux\n")
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  flux:\n    repo_id: test-org/tiny-flux\n    family: text_to_image\n"
                      f"    path: {tmp_path / 'models' / 'flux'}\n    dtype: float32\n")
    hub = start_hub(tmp_path, {"test-org/tiny-flux": repo})
    try:
        done = run_download(hub.url, tmp_path, config, "--model", "flux")
    finally:
        hub.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / "models" / "flux"
    assert checkpoint_state(folder) == "downloaded"
    assert not (folder / "flux1-schnell.safetensors").exists() and not (folder / "README.md").exists()
    assert (folder / "tokenizer_2" / "tokenizer.json").is_file() and (folder / "scheduler").is_dir()
    spec = replace(settings.models["flux"], path=folder)
    adapter = load_family(spec, "cpu")
    try:
        result = adapter.generate(adapter.prepare(GenerationRequest(prompt="a cat")), params(seed=3))
    finally:
        adapter.release()
    assert pixels(result.images[0]).shape == (48, 64, 3)


@pytest.mark.parametrize("extra,needle", [
    ("offload: model", "models.a.offload"),
    ("family: text_to_image\n    quantization: 4bit", "models.a.quantization"),
    ("family: text_to_image\n    generation: {width: 1000}", "models.a.generation.width"),
    ("family: text_to_image\n    generation: {num_inference_steps: 80}", "num_inference_steps"),
    ("family: image_edit\n    limits: {max_images: 0}", "models.a.limits.max_images"),  # unset: from the checkpoint
    ("family: text_to_image\n    offload: disk", "models.a.offload"),
])
def test_image_settings_that_make_no_sense_stop_the_start(tmp_path, extra, needle):
    family = "" if "family" in extra else "    family: text\n"
    text = f"models:\n  a:\n    repo_id: x/y\n{family}    {extra}\n"
    config = tmp_path / "m.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(config, env={})


# ------------------------------------------------------------------ HTTP: a real server process

@pytest.fixture(scope="module")
def server(start_server):
    return start_server(MAX_LOADED_MODELS=3, MODEL_IDLE_TIMEOUT=600)


def post(server, key: str, body=None, **kwargs):
    return requests.post(f"{server.url}/generate/{key}", json=body, timeout=120, **kwargs)


def test_generate_returns_pngs_of_the_asked_size(server):
    r = post(server, "flux", {"prompt": "a lighthouse", "width": 96, "height": 64, "num_images": 2, "seed": 11})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "flux" and body["seed"] == 11 and len(body["images"]) == 2
    assert [b64_pixels(i).shape for i in body["images"]] == [(64, 96, 3), (64, 96, 3)]
    assert set(body["timings"]) >= {"queue_seconds", "generate_seconds", "total_seconds"}
    unseeded = post(server, "flux", {"prompt": "a lighthouse"}).json()
    assert isinstance(unseeded["seed"], int) and b64_pixels(unseeded["images"][0]).shape == (64, 64, 3)  # demo default


def test_same_seed_same_image_different_seed_differs(server):
    def one(seed):
        r = post(server, "flux", {"prompt": "a lighthouse at dawn", "width": 64, "height": 64, "seed": seed})
        return b64_pixels(r.json()["images"][0])
    first, again, other = one(5), one(5), one(6)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 10


def test_edit_returns_a_png_of_the_asked_size_json_and_upload(server):
    r = post(server, "qwen_image_edit", {"prompt": "make it blue", "image": ms.b64(photo()), "width": 80,
                                         "height": 48, "seed": 3, "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert b64_pixels(r.json()["images"][0]).shape == (48, 80, 3)
    upload = requests.post(f"{server.url}/generate/qwen_image_edit", timeout=120,
                           files={"image": ("in.png", photo(), "image/png")},
                           data={"prompt": "make it blue", "width": "80", "height": "48", "seed": "3",
                                 "num_inference_steps": "2"})
    assert upload.status_code == 200, upload.text
    assert np.array_equal(b64_pixels(upload.json()["images"][0]), b64_pixels(r.json()["images"][0]))


@pytest.mark.parametrize("key,body,field", [
    ("flux", {"prompt": "x", "width": 100}, "width"),
    ("flux", {"prompt": "x", "height": 8}, "height"),
    ("flux", {"prompt": "x", "width": 2048, "height": 2048}, "width"),
    ("flux", {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ("flux", {"prompt": "x", "num_inference_steps": 17}, "num_inference_steps"),
    ("flux", {"prompt": "x", "num_images": 5}, "num_images"),
    ("flux", {"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ("flux", {"prompt": "x", "true_cfg_scale": -1}, "true_cfg_scale"),
    ("flux", {"prompt": "x", "seed": -3}, "seed"),
    ("flux", {"prompt": ""}, "prompt"),
    ("flux", {"prompt": "x", "negative_prompt": 5}, "negative_prompt"),
    ("flux", {"prompt": "x", "max_new_tokens": 8}, "max_new_tokens"),
    ("flux", {"prompt": "x", "stream": True}, "stream"),
    ("flux", {"prompt": "x", "image": ms.b64(ms.png())}, "image"),
    ("flux", {"prompt": "x <|endoftext|>"}, "prompt"),
    ("qwen_image_edit", {"prompt": "x"}, "image"),
    ("qwen_image_edit", {"prompt": "x", "image": "not base64!"}, "image"),
    ("qwen_image_edit", {"prompt": "x", "image": ms.b64(ms.png(640, 20))}, "image"),  # 32:1
    ("qwen_image_edit", {"prompt": "x", "images": [ms.b64(ms.png()), ms.b64(ms.png())]}, "images[1]"),
    ("qwen_image_edit", {"prompt": "x <|image_pad|>", "image": ms.b64(ms.png())}, "prompt"),
])
def test_bad_parameters_are_400_naming_the_field(server, key, body, field):
    r = post(server, key, body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()


def test_over_the_synchronous_limit_is_400_pointing_to_a_job(server):
    r = post(server, "flux", {"prompt": "x", "num_inference_steps": 16, "num_images": 4, "width": 2048,
                              "height": 1024})  # within max_steps, max_image_pixels and max_images_out each
    assert r.status_code == 400
    details = r.json()["details"]
    assert "limits.max_sync_step_pixels" in details and "POST /jobs/flux" in details


def test_concurrent_requests_are_batched_and_equal_their_solo_results(server):
    bodies = [{"prompt": f"picture number {i} of a quiet harbour", "seed": 40 + i, "width": 64, "height": 64}
              for i in range(4)]
    solo = [b64_pixels(post(server, "flux", body).json()["images"][0]) for body in bodies]
    before = _engine(server, "flux")
    blocker = {"prompt": "a big slow one", "width": 1024, "height": 1024, "num_inference_steps": 16, "seed": 1}
    with ThreadPoolExecutor(5) as pool:
        slow = pool.submit(post, server, "flux", blocker)
        assert _wait(lambda: _engine(server, "flux")["running_batch"] == 1)
        futures = [pool.submit(post, server, "flux", body) for body in bodies]
        answers = [f.result() for f in futures]
        assert slow.result().status_code == 200
    after = _engine(server, "flux")
    for alone, answer in zip(solo, answers):
        assert answer.status_code == 200, answer.text
        assert close(alone, b64_pixels(answer.json()["images"][0]))
    assert after["rows"] - before["rows"] == 5
    assert after["batches"] - before["batches"] < 5  # the four that queued behind the big one shared calls


def test_openai_images_through_the_official_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    made = client.images.generate(model="flux", prompt="a red kite", n=2, size="80x48", extra_body={"seed": 9})
    assert len(made.data) == 2 and made.data[0].url is None
    assert b64_pixels(made.data[0].b64_json).shape == (48, 80, 3)
    ours = post(server, "flux", {"prompt": "a red kite", "num_images": 2, "width": 80, "height": 48,
                                 "seed": 9}).json()
    assert np.array_equal(b64_pixels(made.data[1].b64_json), b64_pixels(ours["images"][1]))
    edited = client.images.edit(model="qwen_image_edit", image=("in.png", photo(), "image/png"), prompt="add snow",
                                size="64x64", extra_body={"seed": 2, "num_inference_steps": 2})
    assert len(edited.data) == 1 and b64_pixels(edited.data[0].b64_json).shape == (64, 64, 3)
    for kwargs, param in [(dict(model="flux", prompt="x", response_format="url"), "response_format"),
                          (dict(model="flux", prompt="x", size="100x64"), "size"),
                          (dict(model="flux", prompt="x", n=9), "n"),
                          (dict(model="deepseek", prompt="x"), "model"),
                          (dict(model="qwen_image_edit", prompt="x"), "model")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(**kwargs)
        assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model="flux", image=("in.png", photo(), "image/png"), prompt="x")
    assert info.value.body["param"] == "model"


def test_image_models_take_part_in_lru_eviction(start_server):
    server = start_server(MAX_LOADED_MODELS=1, MODEL_IDLE_TIMEOUT=600)
    for key, body in [("deepseek", {"prompt": "hello", "max_new_tokens": 2}), ("flux", {"prompt": "a cat"}),
                      ("deepseek", {"prompt": "hello again", "max_new_tokens": 2})]:
        assert post(server, key, body).status_code == 200
    status = requests.get(server.url + "/admin/model_status", timeout=10).json()["models"]
    assert status["deepseek"]["loaded"] and status["deepseek"]["load_count"] == 2
    assert not status["flux"]["loaded"] and status["flux"]["load_count"] == 1
    assert status["flux"]["last_unload_reason"] == "count"
    assert status["flux"]["bytes_estimated"] > 0


# ------------------------------------------------------------------ helpers

def _engine(server, key: str) -> dict:
    return requests.get(server.url + "/admin/model_status", timeout=10).json()["models"][key].get("engine") or {
        "rows": 0, "batches": 0, "running_batch": 0}


def _wait(predicate, timeout: float = 60.0) -> bool:
    from tests.conftest import wait_for
    return wait_for(predicate, timeout=timeout, interval=0.01)

