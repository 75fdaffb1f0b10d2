"""utils/media/decode.py: base64, images, audio, video; real decoding of media made by tests/media_samples.py."""
from __future__ import annotations

import base64
import io
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from utils.media import decode as media
from utils.errors import InvalidInput, PayloadTooLarge
from utils.media.decode import (MediaLimits, MediaTooLarge, VideoClip, decode_base64, load_audio, load_image,
                         load_video, sample_indices, sniff_format, sniff_kind)

try:
    from tests import media_samples as ms
except ImportError:   # tests/ on sys.path instead of the repository root
    import media_samples as ms

LIMITS = MediaLimits()


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def expect_invalid(call, field: str, *fragments: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        call()
    err = info.value
    assert err.status == 400 and err.field == field
    assert err.to_dict()["field"] == field
    for fragment in fragments:
        assert fragment in err.details, err.details
    return err


def expect_too_large(call, field: str, *fragments: str) -> MediaTooLarge:
    with pytest.raises(MediaTooLarge) as info:
        call()
    err = info.value
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert err.field == field and err.to_dict()["field"] == field
    for fragment in fragments:
        assert fragment in err.details, err.details
    return err


# ---------------------------------------------------------------- base64

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff"   # contains bytes that encode to + / and - _


class TestDecodeBase64:
    def test_standard_with_padding(self):
        assert decode_base64(ms.b64(PAYLOAD), "f", 10_000) == PAYLOAD

    @pytest.mark.parametrize("padding", [False, True])
    def test_urlsafe(self, padding):
        text = ms.b64url(PAYLOAD, padding=padding)
        assert "-" in text or "_" in text
        assert decode_base64(text, "f", 10_000) == PAYLOAD

    def test_standard_without_padding(self):
        for data in (b"a", b"ab", b"abc", b"abcd"):
            assert decode_base64(ms.b64(data).rstrip("="), "f", 100) == data

    def test_whitespace_and_newlines(self):
        text = base64.encodebytes(PAYLOAD).decode()   # MIME style: a newline every 76 characters
        assert "\n" in text
        assert decode_base64("  " + text.replace("\n", "\r\n") + "\t", "f", 10_000) == PAYLOAD

    @pytest.mark.parametrize("prefix", ["data:image/png;base64,", "DATA:image/png;BASE64,",
                                        "data:image/png;name=a.png;base64,", "data:;base64,"])
    def test_data_url(self, prefix):
        assert decode_base64(prefix + ms.b64(PAYLOAD), "f", 10_000) == PAYLOAD

    def test_data_url_helper_round_trip(self):
        png = ms.png()
        assert decode_base64(ms.data_url(png, "image/png"), "images[0]", 10_000) == png

    @pytest.mark.parametrize("value", [None, 12, b"aGVsbG8=", ["aGVsbG8="], {"b64": "x"}])
    def test_rejects_non_strings(self, value):
        expect_invalid(lambda: decode_base64(value, "images[1]", 100), "images[1]", "base64 string")

    @pytest.mark.parametrize("value", ["", "   ", "\n", "data:image/png;base64,", "===="])
    def test_rejects_empty(self, value):
        expect_invalid(lambda: decode_base64(value, "audio", 100), "audio")

    @pytest.mark.parametrize("value", [
        "aGVsbG8$",            # character outside the alphabet
        "aGVsb",               # impossible length (4n+1)
        "aG=VsbG8=",           # padding in the middle
        "aGVsbG8===",          # too much padding
        "aGV+bG8_",            # standard and URL-safe alphabets mixed
        "aGVsbG8é",            # non-ASCII
        "data:text/plain,hello",            # data URL that is not base64
        "data:image/png;base64",            # no comma
    ])
    def test_rejects_invalid(self, value):
        expect_invalid(lambda: decode_base64(value, "video", 100), "video")

    def test_size_cap(self):
        data = b"x" * 300
        assert decode_base64(ms.b64(data), "f", 300) == data   # exactly at the cap is fine
        expect_too_large(lambda: decode_base64(ms.b64(data), "f", 299), "f", "299")
        # a huge string is refused before any decoding work
        expect_too_large(lambda: decode_base64("A" * 10_000_000, "f", 1000), "f")


# ---------------------------------------------------------------- sniffing


@pytest.mark.parametrize("data, kind, label", [
    (ms.png(), "image", "png"), (ms.jpeg(), "image", "jpeg"), (ms.image("GIF"), "image", "gif"),
    (ms.image("WEBP"), "image", "webp"), (ms.image("BMP"), "image", "bmp"), (ms.image("TIFF"), "image", "tiff"),
    (ms.audio("wav", 0.1), "audio", "wav"), (ms.audio("flac", 0.1), "audio", "flac"),
    (ms.audio("mp3", 0.1), "audio", "mp3"), (ms.audio("ogg", 0.1), "audio", "ogg"),
    (ms.audio("opus", 0.1), "audio", "ogg"), (ms.audio("m4a", 0.1), "audio", "m4a"),
    (ms.video("mp4", 2), "video", "mp4"), (ms.video("mov", 2), "video", "mov"),
    (ms.video("avi", 2), "video", "avi"), (ms.video("webm", 2), "video", "webm"),
    (ms.garbage(64), None, None), (b"", None, None), (b"#EXTM3U\n#EXT-X-VERSION:3\n", None, None),
])
def test_sniff(data, kind, label):
    assert sniff_kind(data) == kind
    assert sniff_format(data) == label


# ---------------------------------------------------------------- images


class TestLoadImage:
    def test_png_exact_pixels(self):
        image = load_image(ms.png(32, 24, (10, 200, 30)), "images[0]", LIMITS)
        assert image.mode == "RGB" and image.size == (32, 24)
        arr = np.asarray(image)
        assert arr.shape == (24, 32, 3)
        assert (arr == np.array([10, 200, 30], dtype=np.uint8)).all()

    def test_jpeg_close_pixels(self):
        arr = np.asarray(load_image(ms.jpeg(40, 30, (200, 40, 90)), "f", LIMITS))
        assert arr.shape == (30, 40, 3)
        assert np.abs(arr.astype(int) - [200, 40, 90]).max() <= 4

    @pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
    def test_other_formats(self, fmt):
        save = {"lossless": True} if fmt == "WEBP" else {}
        image = load_image(ms.image(fmt, 16, 8, (0, 0, 255), **save), "f", LIMITS)
        assert image.mode == "RGB" and image.size == (16, 8)
        assert np.abs(np.asarray(image).astype(int) - [0, 0, 255]).max() <= 2

    def test_transparency_becomes_white(self):
        rgba = ms.image("PNG", 8, 8, (255, 0, 0, 0), mode="RGBA")   # fully transparent red
        assert (np.asarray(load_image(rgba, "f", LIMITS)) == 255).all()
        half = ms.image("PNG", 8, 8, (0, 0, 0, 128), mode="RGBA")
        assert np.abs(np.asarray(load_image(half, "f", LIMITS)).astype(int) - 127).max() <= 1

    def test_grayscale_palette_and_16_bit(self):
        gray = np.asarray(load_image(ms.image("PNG", 4, 4, 77, mode="L"), "f", LIMITS))
        assert gray.shape == (4, 4, 3) and (gray == 77).all()
        palette = ms.image("PNG", 4, 4, (1, 2, 3), mode="RGB")
        buf = io.BytesIO()
        Image.open(io.BytesIO(palette)).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
        assert (np.asarray(load_image(buf.getvalue(), "f", LIMITS)) == [1, 2, 3]).all()
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buf, "PNG")   # 16-bit white
        assert (np.asarray(load_image(buf.getvalue(), "f", LIMITS)) == 255).all()

    def test_exif_orientation_applied(self):
        exif = Image.Exif()
        exif[0x0112] = 6   # "rotate 90 CW to display"
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (0, 255, 0)).save(buf, "JPEG", exif=exif)
        assert load_image(buf.getvalue(), "f", LIMITS).size == (24, 32)

    def test_pixel_bomb_header_rejected_before_decoding(self):
        bomb = ms.png_bomb(7000, 7000)     # 49 M pixels > 40 M cap, ~70 bytes
        assert len(bomb) < 100
        start = time.perf_counter()
        expect_too_large(lambda: load_image(bomb, "images[2]", LIMITS), "images[2]", "7000x7000")
        assert time.perf_counter() - start < 0.5

    def test_pil_decompression_bomb_error_mapped(self):
        # > 2 x PIL's own MAX_IMAGE_PIXELS: PIL raises DecompressionBombError inside Image.open
        bomb = ms.png_bomb(100_000, 100_000)
        big = MediaLimits(max_image_pixels=10**12)
        expect_too_large(lambda: load_image(bomb, "images[0]", big), "images[0]")

    def test_real_image_over_a_small_cap(self):
        expect_too_large(lambda: load_image(ms.png(20, 20), "f", MediaLimits(max_image_pixels=399)), "f", "400")
        assert load_image(ms.png(20, 20), "f", MediaLimits(max_image_pixels=400)).size == (20, 20)

    def test_byte_cap(self):
        data = ms.png(64, 64)
        expect_too_large(lambda: load_image(data, "f", MediaLimits(max_media_bytes=len(data) - 1)), "f")

    @pytest.mark.parametrize("make", [lambda: ms.png(64, 64), lambda: ms.jpeg(64, 64)])
    def test_truncated(self, make):
        # noisy content so that half the file is really half the pixels
        buf = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        fmt = "PNG" if make()[:4] == b"\x89PNG" else "JPEG"
        Image.fromarray(noise).save(buf, fmt)
        for fraction in (0.1, 0.5, 0.9):
            expect_invalid(lambda: load_image(ms.truncated(buf.getvalue(), fraction), "images[3]", LIMITS),
                           "images[3]")

    def test_png_bomb_pixels_never_decode(self):
        # the patched 1x1 PNG with a header under the cap still fails at decoding: not enough data
        expect_invalid(lambda: load_image(ms.png_bomb(100, 100), "f", LIMITS), "f", "png")

    def test_wrong_kind_and_garbage(self):
        expect_invalid(lambda: load_image(ms.wav(0.1), "images[0]", LIMITS), "images[0]", "audio", "wav")
        expect_invalid(lambda: load_image(ms.video("mp4", 2), "images[0]", LIMITS), "images[0]", "video")
        expect_invalid(lambda: load_image(ms.garbage(), "images[0]", LIMITS), "images[0]",
                       "not a recognised image format")
        expect_invalid(lambda: load_image(b"", "images[0]", LIMITS), "images[0]", "empty")

    def test_formats_outside_the_allow_list(self):
        # PIL could read PPM; the server does not accept it
        expect_invalid(lambda: load_image(ms.image("PPM", 4, 4), "f", LIMITS), "f")


# ---------------------------------------------------------------- audio


class TestLoadAudio:
    @pytest.mark.parametrize("fmt", list(ms.AUDIO_FORMATS))
    def test_each_format_resampled_to_16k_mono(self, fmt):
        data = ms.audio(fmt, seconds=1.0)   # 44.1 kHz stereo (Opus: 48 kHz stereo), 440 Hz, amplitude 0.5
        wave = load_audio(data, "audio", LIMITS)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(len(wave) - 16_000) <= 400, len(wave)     # codec padding is at most ~25 ms
        assert np.abs(wave).max() <= 1.0
        assert abs(dominant_hz(wave, 16_000) - 440) < 3
        # stereo is averaged to mono: the level stays that of one channel
        rms = float(np.sqrt(np.mean(wave[1600:-1600] ** 2)))
        assert abs(rms - 0.5 / np.sqrt(2)) < 0.05, rms

    def test_other_sampling_rate(self):
        wave = load_audio(ms.audio("flac", 1.0, rate=22050, channels=1), "a", LIMITS, sampling_rate=8000)
        assert len(wave) == 8000
        assert abs(dominant_hz(wave, 8000) - 440) < 3

    def test_limits_rate_is_the_default(self):
        wave = load_audio(ms.wav(0.5, rate=44100), "a", MediaLimits(audio_sampling_rate=24_000))
        assert len(wave) == 12_000

    def test_16k_mono_wav_is_sample_exact(self):
        wave = load_audio(ms.audio("wav", 0.5, rate=16000, channels=1, amplitude=0.9), "a", LIMITS)
        expected = ms.sine(0.5, 16000, 1, amplitude=0.9)[0]
        assert len(wave) == len(expected)
        assert np.abs(wave - expected).max() < 1e-3

    def test_loud_stereo_is_not_clipped(self):
        wave = load_audio(ms.audio("wav", 0.5, channels=2, amplitude=0.9), "a", LIMITS)
        assert 0.88 < np.abs(wave).max() < 0.92

    def test_audio_track_of_a_video(self):
        wave = load_audio(ms.video("mp4", 8, 4, audio_track=True), "a", LIMITS)
        assert abs(len(wave) / 16_000 - 2.0) < 0.05

    @pytest.mark.parametrize("fmt", list(ms.AUDIO_FORMATS))
    @pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
    def test_truncated(self, fmt, fraction):
        data = ms.truncated(ms.audio(fmt, seconds=2.0), fraction)
        expect_invalid(lambda: load_audio(data, "audio[0]", LIMITS), "audio[0]")

    def test_truncated_at_a_boundary(self):
        # cut exactly between Ogg pages / between WAV sample frames: FFmpeg alone sees nothing wrong
        ogg = ms.audio("opus", 2.0)
        cut = ogg[: ogg.rfind(b"OggS", 0, len(ogg) // 2)]
        expect_invalid(lambda: load_audio(cut, "a", LIMITS), "a", "end-of-stream")
        wav = ms.wav(1.0, rate=16000, channels=2)
        cut = wav[: 44 + 4 * 8000]   # header + half the sample frames
        expect_invalid(lambda: load_audio(cut, "a", LIMITS), "a", "header announces")

    def test_wrong_kind(self):
        expect_invalid(lambda: load_audio(ms.png(), "audio", LIMITS), "audio", "expected audio", "image", "png")
        expect_invalid(lambda: load_audio(ms.jpeg(), "audio", LIMITS), "audio", "image")
        expect_invalid(lambda: load_audio(ms.video("mp4", 2), "audio", LIMITS), "audio", "no audio stream")
        expect_invalid(lambda: load_audio(ms.garbage(), "audio", LIMITS), "audio", "not a recognised")
        expect_invalid(lambda: load_audio(b"#EXTM3U\nfile:///etc/passwd\n", "audio", LIMITS), "audio")

    def test_corrupt_body_with_a_valid_header(self):
        data = bytearray(ms.audio("flac", 1.0))
        data[200:] = ms.garbage(len(data) - 200)
        expect_invalid(lambda: load_audio(bytes(data), "audio", LIMITS), "audio")

    def test_zero_samples(self):
        expect_invalid(lambda: load_audio(ms.wav(0.0), "audio", LIMITS), "audio", "no audio samples")

    @pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "m4a", "webm"])
    def test_too_long(self, fmt):
        limits = MediaLimits(max_audio_seconds=1.0)
        expect_too_large(lambda: load_audio(ms.audio(fmt, 2.0), "audio", limits), "audio", "1 s")
        assert len(load_audio(ms.audio(fmt, 0.8), "audio", limits)) > 0

    def test_too_long_without_a_declared_duration(self, monkeypatch):
        # the decode loop enforces the cap too (MP3 without Xing header, ADTS, lying headers)
        monkeypatch.setattr(media, "_declared_seconds", lambda *a: None)
        limits = MediaLimits(max_audio_seconds=1.0)
        expect_too_large(lambda: load_audio(ms.audio("flac", 2.0), "audio", limits), "audio")

    def test_byte_cap(self):
        data = ms.wav(0.2)
        expect_too_large(lambda: load_audio(data, "a", MediaLimits(max_media_bytes=1000)), "a", "1000")


# ---------------------------------------------------------------- video


def test_sample_indices():
    assert sample_indices(1, 8) == [0]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(40, 8) == [0, 6, 11, 17, 22, 28, 33, 39]
    assert sample_indices(100, 3) == [0, 50, 99]
    assert sample_indices(100, 1) == [0]


class TestLoadVideo:
    @pytest.mark.parametrize("fmt", list(ms.VIDEO_FORMATS))
    def test_each_container_samples_evenly(self, fmt):
        clip = load_video(ms.video(fmt, frames=40, fps=10, w=64, h=48), "video", LIMITS)
        assert isinstance(clip, VideoClip)
        assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, 48, 64, 3)
        assert clip.total_frames == 40
        assert clip.frame_indices == [0, 6, 11, 17, 22, 28, 33, 39]
        assert [ms.frame_index(f) for f in clip.frames] == clip.frame_indices   # the right frames
        assert clip.fps == pytest.approx(10.0)
        assert clip.duration == pytest.approx(4.0, abs=0.11)
        # RGB order: frame 0 is all "0" stripes = blue
        assert np.abs(clip.frames[0, 12, 4].astype(int) - [0, 0, 255]).max() < 40
        # frame 39 = 0b100111: stripe 0 is a red "1"
        assert np.abs(clip.frames[-1, 12, 4].astype(int) - [255, 0, 0]).max() < 40

    @pytest.mark.parametrize("fmt", ["mp4", "mov"])
    def test_fragmented_mp4(self, fmt):
        clip = load_video(ms.video(fmt, frames=12, fps=6, fragmented=True), "video", LIMITS)
        assert clip.total_frames == 12
        assert [ms.frame_index(f) for f in clip.frames] == clip.frame_indices == sample_indices(12, 8)

    def test_b_frames_follow_presentation_order(self):
        clip = load_video(ms.video("mp4", frames=20, fps=10, bframes=2), "video", LIMITS)
        assert [ms.frame_index(f) for f in clip.frames] == clip.frame_indices == sample_indices(20, 8)

    def test_fewer_frames_than_the_cap_are_all_kept_odd_count_not_padded(self):
        clip = load_video(ms.video("mp4", frames=5, fps=5), "video", LIMITS)
        assert clip.frames.shape[0] == 5 and clip.frame_indices == [0, 1, 2, 3, 4]
        one = load_video(ms.video("webm", frames=1, fps=5), "video", LIMITS)
        assert one.frames.shape == (1, 48, 64, 3) and one.frame_indices == [0] and one.total_frames == 1

    def test_max_video_frames(self):
        clip = load_video(ms.video("avi", frames=40, fps=10), "v", MediaLimits(max_video_frames=4))
        assert clip.frame_indices == [0, 13, 26, 39]
        assert [ms.frame_index(f) for f in clip.frames] == [0, 13, 26, 39]

    def test_display_rotation_applied(self):
        clip = load_video(ms.video("mp4", frames=4, fps=4, w=64, h=48, rotation=90), "v", LIMITS)
        assert clip.frames.shape == (4, 64, 48, 3)
        assert [ms.frame_index(np.rot90(f, -1)) for f in clip.frames] == [0, 1, 2, 3]

    def test_resolution_change_mid_stream(self):
        # VP8 key frames carry their own size: 10 frames at 64x48 then 10 at 32x24 in one WebM stream
        buf = io.BytesIO()
        options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        with av.open(buf, "w", format="webm") as out:
            stream = out.add_stream("libvpx", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.codec_context.options = options
            small = av.CodecContext.create("libvpx", "w")
            small.width, small.height, small.pix_fmt = 32, 24, "yuv420p"
            small.time_base, small.framerate, small.options = Fraction(1, 10), 10, options
            for encoder, (w, h), indices in ((stream.codec_context, (64, 48), range(10)),
                                             (small, (32, 24), range(10, 20))):
                for i in list(indices) + [None]:
                    frame = None
                    if i is not None:
                        frame = av.VideoFrame.from_ndarray(ms.index_frame(i, w, h), format="rgb24")
                        frame.pts = i
                    for packet in encoder.encode(frame):
                        packet.stream = stream
                        out.mux(packet)
        clip = load_video(buf.getvalue(), "v", LIMITS)
        assert clip.frames.shape == (8, 48, 64, 3) and clip.total_frames == 20   # all at the first size
        assert [ms.frame_index(f) for f in clip.frames] == clip.frame_indices == sample_indices(20, 8)

    def test_with_audio_track(self):
        for fmt in ("mp4", "webm", "avi"):
            clip = load_video(ms.video(fmt, frames=20, fps=10, audio_track=True), "v", LIMITS)
            assert clip.total_frames == 20
            assert [ms.frame_index(f) for f in clip.frames] == sample_indices(20, 8)

    def test_fewer_decodable_frames_than_packets_resamples(self, monkeypatch):
        real_scan = media._scan_video

        def overcounting_scan(*args):
            scan = real_scan(*args)
            return {**scan, "packets": scan["packets"] + 10}

        monkeypatch.setattr(media, "_scan_video", overcounting_scan)
        clip = load_video(ms.video("mp4", frames=20, fps=10), "v", LIMITS)
        assert clip.total_frames == 20
        assert [ms.frame_index(f) for f in clip.frames] == clip.frame_indices == sample_indices(20, 8)

    @pytest.mark.parametrize("fmt", list(ms.VIDEO_FORMATS))
    @pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
    def test_truncated(self, fmt, fraction):
        data = ms.truncated(ms.video(fmt, frames=40, fps=10), fraction)
        expect_invalid(lambda: load_video(data, "videos[0]", LIMITS), "videos[0]")

    @pytest.mark.parametrize("fmt", ["mp4", "mov"])
    def test_truncated_fragmented(self, fmt):
        data = ms.video(fmt, frames=40, fps=10, fragmented=True)
        for fraction in (0.05, 0.5, 0.9):
            expect_invalid(lambda: load_video(ms.truncated(data, fraction), "v", LIMITS), "v")

    def test_wrong_kind(self):
        expect_invalid(lambda: load_video(ms.wav(0.2), "video", LIMITS), "video", "expected video", "audio", "wav")
        expect_invalid(lambda: load_video(ms.audio("m4a", 0.2), "video", LIMITS), "video", "audio", "m4a")
        expect_invalid(lambda: load_video(ms.jpeg(), "video", LIMITS), "video", "image", "jpeg")
        expect_invalid(lambda: load_video(ms.garbage(), "video", LIMITS), "video", "not a recognised")
        expect_invalid(lambda: load_video(ms.audio("webm", 0.3), "video", LIMITS), "video", "no video stream")

    @pytest.mark.parametrize("fmt", ["mp4", "avi", "webm"])
    def test_too_long(self, fmt, monkeypatch):
        limits = MediaLimits(max_video_seconds=2.0)
        data = ms.video(fmt, frames=40, fps=10)   # 4 s
        expect_too_large(lambda: load_video(data, "video", limits), "video", "2 s")
        monkeypatch.setattr(media, "_declared_seconds", lambda *a: None)   # timestamps alone catch it
        expect_too_large(lambda: load_video(data, "video", limits), "video")

    def test_frame_pixel_cap(self):
        data = ms.video("mp4", frames=2, fps=2, w=64, h=48)
        expect_too_large(lambda: load_video(data, "v", MediaLimits(max_image_pixels=64 * 48 - 1)), "v", "64x48")

    def test_byte_cap(self):
        data = ms.video("mp4", frames=4)
        expect_too_large(lambda: load_video(data, "v", MediaLimits(max_media_bytes=len(data) - 1)), "v")

    def test_metadata_feeds_the_qwen_video_processor(self):
        clip = load_video(ms.video("mp4", frames=30, fps=10), "v", MediaLimits(max_video_frames=3))
        meta = clip.metadata()
        assert meta.total_num_frames == 30 and meta.fps == pytest.approx(10.0)
        assert meta.frames_indices == [0, 15, 29] and meta.video_backend == "pyav"
        assert (meta.height, meta.width) == (48, 64) and meta.duration == pytest.approx(3.0, abs=0.11)
        assert meta.sampled_fps == pytest.approx(1.0)
        pytest.importorskip("torchvision")
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
        out = processor(videos=[clip.frames], video_metadata=[meta], return_tensors="np")
        # 3 frames (odd) -> padded by the processor to 2 temporal patches
        assert out["video_grid_thw"][0][0] == 2
