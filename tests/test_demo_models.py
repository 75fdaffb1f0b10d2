"""The tiny demo checkpoints load through the real classes and generate for every medium they serve."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.hub import demo_models
from utils.hub.demo_models import DEMO_KEYS, DEMO_VERSION, MARKER_NAME, build_demo_models, demo_family

NEW_TOKENS = 4
SR = 16000

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_models")


@pytest.fixture(scope="module")
def demo(demo_root) -> dict[str, Path]:
    return build_demo_models(demo_root)


@pytest.fixture(scope="module")
def image_small() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_wide() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 200, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A real 4-frame mp4 read back the way the server does: load_video(path, backend="pyav")."""
    import av
    from transformers.video_utils import load_video

    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    rng = np.random.default_rng(2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 80, 56, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (56, 80, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, meta = load_video(str(path), backend="pyav")
    assert frames.shape[0] == 4
    return frames, meta


@pytest.fixture(scope="module")
def waveform() -> np.ndarray:
    t = np.arange(SR, dtype=np.float32) / SR  # 1 s of 16 kHz audio
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _new_text(processor_or_tok, out: torch.Tensor, prompt_len: int) -> list[str]:
    assert out.shape[1] == prompt_len + NEW_TOKENS, "the demo model must generate exactly max_new_tokens"
    texts = processor_or_tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    for text in texts:
        assert isinstance(text, str)
        words = text.split()
        assert len(words) == NEW_TOKENS, f"expected space-separated words, got {text!r}"
    return texts


# ------------------------------------------------------------------------------------------ build/cache

def test_api_and_markers(demo, demo_root):
    assert set(demo) == set(DEMO_KEYS)
    assert [demo_family(k) for k in DEMO_KEYS] == ["text", "vision_language", "vqa", "audio", "omni",
                                                   "text_to_image", "image_edit", "janus", "speech_to_text"]
    with pytest.raises(KeyError):
        demo_family("nope")
    with pytest.raises(KeyError):
        build_demo_models(demo_root, ["nope"])
    for key, path in demo.items():
        assert path == demo_root / key
        marker = json.loads((path / MARKER_NAME).read_text())
        assert marker["version"] == DEMO_VERSION and marker["key"] == key
        if demo_family(key) in ("text_to_image", "image_edit"):  # diffusers pipelines: one folder per component
            assert (path / "model_index.json").is_file()
            assert (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
            assert (path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
            assert (path / "text_encoder" / "model.safetensors").is_file()
        else:
            assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert size < 3_000_000, f"{key} is {size} bytes"  # janus: a 5-level VQ-VAE of 32 channels (GroupNorm's minimum)
    assert (demo_root / "qwen_omni" / "spk_dict.pt").is_file()
    assert not [p for p in demo_root.iterdir() if p.name.startswith(".building-")]


def test_second_build_is_noop(demo, demo_root):
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*") if p.is_file() and p.name != ".demo.lock"}
    again = build_demo_models(demo_root)
    assert again == demo
    after = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*") if p.is_file() and p.name != ".demo.lock"}
    assert after == before


def test_stale_or_partial_dirs_are_rebuilt(tmp_path):
    first = build_demo_models(tmp_path, ["deepseek"])["deepseek"]
    weights = (first / "model.safetensors").read_bytes()
    marker = first / MARKER_NAME
    marker.write_text(json.dumps({"version": DEMO_VERSION - 1}))  # an older layout
    (tmp_path / ".building-deepseek-dead").mkdir()  # left by a builder that died
    (tmp_path / "qwen_vl").mkdir()  # a dir without a marker never counts as built
    paths = build_demo_models(tmp_path, ["deepseek", "qwen_vl"])
    assert json.loads(marker.read_text())["version"] == DEMO_VERSION
    assert (paths["deepseek"] / "model.safetensors").read_bytes() == weights  # deterministic weights
    assert (paths["qwen_vl"] / MARKER_NAME).is_file()
    assert not (tmp_path / ".building-deepseek-dead").exists()
    mtime = marker.stat().st_mtime_ns
    build_demo_models(tmp_path, ["deepseek"], force=True)
    assert marker.stat().st_mtime_ns != mtime


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls = []
    real = demo_models._BUILDERS["blip_vqa"]

    def counting(out):
        calls.append(out)
        real(out)

    monkeypatch.setitem(demo_models._BUILDERS, "blip_vqa", counting)
    results, errors = [], []

    def run():
        try:
            results.append(build_demo_models(tmp_path, ["blip_vqa"]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1  # fcntl lock + marker re-check under the lock
    assert all(r == {"blip_vqa": tmp_path / "blip_vqa"} for r in results)


# ------------------------------------------------------------------------------------------ text

@pytest.fixture(scope="module")
def deepseek_tok(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo["deepseek"])


def _deepseek_inputs(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a cat?"},
        {"role": "assistant", "content": "<think>hmm</think>A small animal."},
        {"role": "user", "content": "And a dog?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is a cat?")
    assert "hmm" not in prompt and prompt.endswith("<｜User｜>And a dog?<｜Assistant｜>")
    return tok(prompt, return_tensors="pt", add_special_tokens=False)


def test_deepseek_generates(demo, deepseek_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo["deepseek"])
    assert type(model).__name__ == "Qwen3ForCausalLM"
    tok = deepseek_tok
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.decode(tok("the red car").input_ids) == "the red car"
    inputs = _deepseek_inputs(tok)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(tok, out, inputs["input_ids"].shape[1])
    # left-padded batch
    tok.padding_side = "left"
    batch = tok(["<｜User｜>hi<｜Assistant｜>", "<｜User｜>what is the blue sky<｜Assistant｜>"],
                return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS)
    _new_text(tok, out, batch["input_ids"].shape[1])


@pytest.mark.parametrize("bits", [4, 8])
def test_deepseek_bitsandbytes_cpu(demo, deepseek_tok, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(demo["deepseek"], quantization_config=quant, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    inputs = _deepseek_inputs(deepseek_tok)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(deepseek_tok, out, inputs["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------ vision-language

@pytest.fixture(scope="module")
def qwen_vl(demo):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(demo["qwen_vl"])
    model = AutoModelForImageTextToText.from_pretrained(demo["qwen_vl"])
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    return processor, model


def _vl_prompt(processor, content):
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("case", ["image", "two_images", "video", "images_and_video", "text"])
def test_qwen_vl_generates(qwen_vl, image_small, image_wide, video, case):
    processor, model = qwen_vl
    frames, meta = video
    images = {"image": [image_small], "two_images": [image_small, image_wide], "video": None,
              "images_and_video": [image_small, image_wide], "text": None}[case]
    with_video = "video" in case
    content = [{"type": "image"} for _ in images or []] + ([{"type": "video"}] if with_video else [])
    content.append({"type": "text", "text": "What is in it?"})
    prompt = _vl_prompt(processor, content)
    assert prompt.count("<|image_pad|>") == len(images or []) and prompt.endswith("<|im_start|>assistant\n")
    kwargs = {"videos": [frames], "video_metadata": [meta]} if with_video else {}
    inputs = processor(text=[prompt], images=images, return_tensors="pt", **kwargs)
    if images:
        assert inputs["image_grid_thw"].shape[0] == len(images)
        assert inputs["pixel_values"].shape[0] <= 16 * 4 * len(images)  # small pixel budget
    if with_video:
        assert inputs["video_grid_thw"].tolist()[0][0] == 2  # 4 frames / temporal patch 2
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(processor, out, inputs["input_ids"].shape[1])


def test_qwen_vl_left_padded_batch(qwen_vl, image_small, image_wide):
    processor, model = qwen_vl
    prompts = [_vl_prompt(processor, [{"type": "image"}, {"type": "text", "text": q}])
               for q in ("What?", "What color is the big red car in this picture?")]
    inputs = processor(text=prompts, images=[image_small, image_wide], return_tensors="pt", padding=True,
                       padding_side="left")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert len(_new_text(processor, out, inputs["input_ids"].shape[1])) == 2


def test_qwen_vl_4bit_skips_vision_tower(demo, qwen_vl, image_small):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    processor, _ = qwen_vl
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.visual", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(demo["qwen_vl"], quantization_config=quant, device_map="cpu")
    prompt = _vl_prompt(processor, [{"type": "image"}, {"type": "text", "text": "What?"}])
    inputs = processor(text=[prompt], images=[image_small], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(processor, out, inputs["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------ VQA

def test_blip_vqa_generates(demo, image_wide):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    processor = BlipProcessor.from_pretrained(demo["blip_vqa"])
    model = BlipForQuestionAnswering.from_pretrained(demo["blip_vqa"])
    inputs = processor(images=image_wide, text="How many cats are there?", return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (64, 64)
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == "[CLS] how many cats are there? [SEP]"
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert out.shape == (1, 1 + NEW_TOKENS)  # decoder bos + answer
    answer = processor.decode(out[0], skip_special_tokens=True)
    assert isinstance(answer, str) and len(answer.split()) == NEW_TOKENS


# ------------------------------------------------------------------------------------------ audio

def test_qwen_audio_generates(demo, waveform):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(demo["qwen_audio"])
    model = Qwen2AudioForConditionalGeneration.from_pretrained(demo["qwen_audio"])
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                             {"type": "text", "text": "What is this sound?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>" in prompt
    inputs = processor(text=prompt, audio=[waveform], sampling_rate=SR, return_tensors="pt")
    assert inputs["input_features"].shape[1] == 128
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(processor, out, inputs["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------ omni

@pytest.fixture(scope="module")
def qwen_omni(demo):
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    processor = AutoProcessor.from_pretrained(demo["qwen_omni"])
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(demo["qwen_omni"], enable_audio_output=False)
    assert type(processor).__name__ == "Qwen2_5OmniProcessor"
    assert not hasattr(model, "talker")
    return processor, model


@pytest.mark.parametrize("media", ["image+audio+video", "image", "audio", "video", "image+audio", ""])
def test_qwen_omni_thinker_generates(qwen_omni, image_wide, waveform, video, media):
    processor, model = qwen_omni
    frames, meta = video
    parts = set(filter(None, media.split("+")))
    content = [{"type": kind} for kind in ("image", "audio", "video") if kind in parts]
    content.append({"type": "text", "text": "What happens here?"})
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    kwargs = {}
    if "image" in parts:
        kwargs["images"] = [image_wide]
    if "audio" in parts:
        kwargs["audio"] = [waveform]
    if "video" in parts:
        kwargs.update(videos=[frames], video_metadata=[meta])
    inputs = processor(text=prompt, return_tensors="pt", padding=True, **kwargs)
    assert ("input_features" in inputs) == ("audio" in parts)
    assert ("pixel_values_videos" in inputs) == ("video" in parts)
    out = model.thinker.generate(**inputs, max_new_tokens=NEW_TOKENS)
    _new_text(processor, out, inputs["input_ids"].shape[1])
