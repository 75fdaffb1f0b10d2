"""Speech to text (family speech_to_text, the tiny demo Whisper): /v1/audio/transcriptions in every
response format, languages, prompts, long audio in windows, batching, and the refusals. The real
WhisperForConditionalGeneration.generate runs every time; its random weights write noise words,
so the tests check structure, consistency between formats and solo-versus-batched equality."""
from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest

from tests import media_samples as ms
from utils.engine import Engine
from utils.errors import InvalidInput
from utils.families import GenerationRequest, load_family
from utils.families.speech_to_text import TranscriptionParams
from utils.api import transcription

CLOCK = r"\d\d:\d\d:\d\d[,.]\d\d\d"


def transcribe(client, audio: bytes | None = None, **form):
    data = {"model": "whisper", **form}
    if audio is not None:
        data["file"] = (io.BytesIO(audio), "clip.wav")
    return client.post("/v1/audio/transcriptions", data=data, content_type="multipart/form-data")


def clip(seconds: float = 2.0, freq: float = 440.0) -> bytes:
    return ms.wav(seconds, rate=16000, channels=1, freq=freq)


@pytest.fixture(scope="module")
def verbose(client):
    """One clip's verbose_json (segments and words), shared by the tests that compare formats."""
    response = transcribe(client, clip(), response_format="verbose_json",
                          **{"timestamp_granularities[]": ["segment", "word"]})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_json_and_text_formats_agree(client):
    audio = clip(1.5, 330.0)
    body = transcribe(client, audio).get_json()
    assert set(body) == {"text", "usage"} and body["text"] and body["usage"] == {"type": "duration", "seconds": 2}
    text = transcribe(client, audio, response_format="text")
    assert text.status_code == 200 and text.mimetype == "text/plain"
    assert text.get_data(as_text=True) == body["text"] + "\n"


def test_verbose_json_has_segments_within_the_audio_and_words(verbose):
    assert verbose["task"] == "transcribe" and verbose["language"] == "english"  # detected (none given)
    assert verbose["duration"] == pytest.approx(2.0)
    segments = verbose["segments"]
    assert segments and [s["id"] for s in segments] == list(range(len(segments)))
    assert all(0 <= s["start"] <= s["end"] <= verbose["duration"] for s in segments)
    assert "".join(s["text"] for s in segments).strip() == verbose["text"]
    assert all(isinstance(t, int) for s in segments for t in s["tokens"])
    words = verbose["words"]
    assert [w["word"] for w in words] == verbose["text"].split()
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] <= verbose["duration"] for w in words)


def test_srt_and_vtt_carry_the_same_segments(client, verbose):
    audio = clip()
    srt = transcribe(client, audio, response_format="srt").get_data(as_text=True)
    vtt = transcribe(client, audio, response_format="vtt").get_data(as_text=True)
    blocks = [b.split("\n") for b in srt.strip().split("\n\n")]
    assert [int(b[0]) for b in blocks] == list(range(1, len(verbose["segments"]) + 1))
    for block, segment in zip(blocks, verbose["segments"]):
        assert re.fullmatch(f"{CLOCK} --> {CLOCK}", block[1]) and "," in block[1]
        assert block[2] == segment["text"].strip()
    assert vtt.startswith("WEBVTT\n\n")
    cues = [c.split("\n") for c in vtt[len("WEBVTT\n\n"):].strip().split("\n\n")]
    assert [c[1] for c in cues] == [b[2] for b in blocks]
    assert all(re.fullmatch(f"{CLOCK} --> {CLOCK}", c[0]) and "." in c[0] for c in cues)
    assert transcription.srt([{"start": 3661.5, "end": 3662.25, "text": " hi"}]) == \
        "1\n01:01:01,500 --> 01:01:02,250\nhi\n"


def test_the_official_openai_client_reads_every_format(app, client, verbose):
    import httpx2
    import openai

    api = openai.OpenAI(base_url="http://server/v1", api_key="x",
                        http_client=httpx2.Client(transport=httpx2.WSGITransport(app=app)))
    audio = ("clip.wav", clip())
    detailed = api.audio.transcriptions.create(model="whisper", file=audio, response_format="verbose_json",
                                                  timestamp_granularities=["segment", "word"])
    assert detailed.text == verbose["text"] and detailed.language == "english"
    assert [s.end for s in detailed.segments] == [s["end"] for s in verbose["segments"]]
    assert [w.word for w in detailed.words] == [w["word"] for w in verbose["words"]]
    plain = transcribe(client, clip()).get_json()["text"]  # no timestamps: decoded with <|notimestamps|>
    assert api.audio.transcriptions.create(model="whisper", file=audio).text == plain
    assert api.audio.transcriptions.create(model="whisper", file=audio, response_format="srt").startswith("1\n")
    with pytest.raises(openai.BadRequestError) as refused:
        api.audio.transcriptions.create(model="whisper", file=audio, response_format="json",
                                           timestamp_granularities=["word"])
    assert refused.value.body["param"] == "timestamp_granularities"


def test_language_prompt_and_temperature(client):
    audio = clip(1.0, 500.0)
    french = transcribe(client, audio, response_format="verbose_json", language="fr").get_json()
    assert french["language"] == "french"
    plain = transcribe(client, audio).get_json()["text"]
    prompted = transcribe(client, audio, prompt="cat dog bird fish horse")
    assert prompted.status_code == 200 and prompted.get_json()["text"] != plain  # the prompt conditions decoding
    sampled = transcribe(client, audio, temperature="0.8")
    assert sampled.status_code == 200 and sampled.get_json()["text"]


def test_long_audio_is_transcribed_in_30_second_windows(client):
    body = transcribe(client, clip(65.0, 220.0), response_format="verbose_json").get_json()
    segments = body["segments"]
    assert body["duration"] == pytest.approx(65.0) and len(segments) >= 3
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(65.0)
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:]))
    assert max(s["start"] for s in segments) >= 60.0  # the third window was heard


@pytest.mark.parametrize("form,field", [
    (dict(response_format="diarized_json"), "response_format"),
    (dict(response_format="json", **{"timestamp_granularities[]": "word"}), "timestamp_granularities"),
    (dict(response_format="verbose_json", **{"timestamp_granularities[]": "sentence"}), "timestamp_granularities"),
    (dict(language="xx"), "language"),
    (dict(temperature="1.5"), "temperature"),
    (dict(prompt="say <|endoftext|> now"), "prompt"),
    (dict(prompt=" ".join(["horse"] * 300)), "prompt"),
    (dict(stream="true"), "stream"),
])
def test_bad_forms_are_400s_naming_the_field(client, form, field):
    response = transcribe(client, clip(0.5), **form)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["param"] == field


def test_uploads_that_are_not_audio_are_400s(client):
    for upload in (ms.png(), ms.garbage(2048)):
        response = transcribe(client, upload)
        assert response.status_code == 400 and response.get_json()["error"]["param"] == "file"
    assert transcribe(client).get_json()["error"]["param"] == "file"


def test_a_whisper_model_only_transcribes_and_qwen_audio_still_does(client):
    for path, body in (("/generate/whisper", {"prompt": "hi", "audio": ms.b64(clip(0.5))}),
                       ("/v1/chat/completions", {"model": "whisper", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/jobs/whisper", {"prompt": "hi"})):
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.get_json())
    qwen = client.post("/v1/audio/transcriptions", content_type="multipart/form-data",
                       data={"model": "qwen_audio", "file": (io.BytesIO(clip(0.6)), "a.wav")})
    assert qwen.status_code == 200 and qwen.get_json()["text"]
    assert transcribe(client, clip(0.6), response_format="srt", model="qwen_audio").status_code == 400


def test_word_granularity_is_refused_for_a_checkpoint_without_alignment_heads(make_settings, tmp_path):
    spec = make_settings().models["whisper"]
    folder = tmp_path / "whisper"
    shutil.copytree(spec.path, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    del config["alignment_heads"]
    (folder / "generation_config.json").write_text(json.dumps(config))
    from dataclasses import replace
    bare = replace(spec, path=folder)
    form = {"response_format": "verbose_json", "timestamp_granularities[]": "word"}
    with pytest.raises(InvalidInput) as refused:
        transcription.parse(form, b"x", bare)
    assert refused.value.field == "timestamp_granularities" and "'word'" in refused.value.details
    job, options = transcription.parse({"response_format": "verbose_json"}, b"x", bare)
    assert job.params.timestamps and not job.params.words and options.granularities == ("segment",)


# ------------------------------------------------------------------ the engine: batching and cancellation

@pytest.fixture(scope="module")
def whisper(make_settings):
    adapter = load_family(make_settings().models["whisper"], "cpu")
    yield adapter
    adapter.release()


def request(i: int, seconds: float | None = None, prompt: str = "") -> GenerationRequest:
    rng = np.random.default_rng(i)
    n = int(16000 * (seconds or (0.5 + 0.4 * i)))
    audio = (0.3 * np.sin(np.linspace(0, 40 * (i + 3), n)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    return GenerationRequest(prompt=prompt, audios=[audio])


def same(a, b) -> bool:
    fields = ("text", "segments", "language", "completion_tokens", "duration")
    return [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_concurrent_transcriptions_equal_their_solo_answers_and_share_calls(whisper):
    cases = [(request(i), TranscriptionParams(max_new_tokens=6 + i % 3, timestamps=i % 2 == 1, words=i == 3,
                                              language="en" if i % 3 == 0 else None)) for i in range(8)]
    cases += [(request(20 + i, seconds=31 + 12 * i), TranscriptionParams(max_new_tokens=5)) for i in range(2)]
    prepared = [(whisper.prepare(r), p) for r, p in cases]
    solo = [whisper.generate(x, p) for x, p in prepared]
    assert len({r.text for r in solo}) > 5, "the clips must give different answers to catch mix-ups"
    engine = Engine(whisper, key="whisper", max_batch_size=16, max_queue=64, queue_timeout=60.0)
    jobs = [engine.submit(x, p) for x, p in prepared]  # all queued before the worker starts: it batches them
    engine.start()
    try:
        results = [engine.run(job) for job in jobs]
    finally:
        engine.stop()
    assert all(same(a, b) for a, b in zip(results, solo))
    stats = engine.stats()
    assert stats["rows"] == len(cases) and stats["peak_batch"] >= 2 and stats["batches"] < len(cases), stats


class LeavingRow:
    """A batch row whose client leaves after `checks` looks at it (between two decoding steps)."""

    streaming, expired = False, False

    def __init__(self, prepared, params, checks: int) -> None:
        self.prepared, self.params, self.result, self._checks = prepared, params, None, checks

    @property
    def cancelled(self) -> bool:
        self._checks -= 1
        return self._checks < 0

    def finish(self, result) -> None:
        self.result = result


def test_a_client_that_leaves_mid_decoding_ends_its_row_only(whisper):
    params = TranscriptionParams(max_new_tokens=8)
    leaving = LeavingRow(whisper.prepare(request(1)), params, 3)
    staying = LeavingRow(whisper.prepare(request(2)), params, 10**6)
    whisper.generate_batch([leaving, staying])
    assert leaving.result.finish_reason == "cancelled" and not leaving.result.text
    assert same(staying.result, whisper.generate(whisper.prepare(request(2)), params))
    alone = LeavingRow(whisper.prepare(request(3)), params, 2)
    whisper.generate_batch([alone])  # no row left: the call stops between steps
    assert alone.result.finish_reason == "cancelled"
