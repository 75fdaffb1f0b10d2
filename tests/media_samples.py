"""Sample media made in memory with PIL and PyAV, for tests, the demo and the benchmarks.

Every generator returns ``bytes`` (what a client would send before base64). Nothing touches disk.

Images:  ``png(w, h, color)``, ``jpeg(...)``, ``image(fmt, ...)``, ``png_bomb(w, h)`` (a real 1x1 PNG
         whose header claims ``w`` x ``h`` pixels: tiny bytes, huge claimed size).
Audio:   ``wav(seconds, rate, channels)``, ``audio(fmt, seconds, ...)`` with fmt in ``AUDIO_FORMATS``;
         a sine of ``freq`` Hz (default 440), 44.1 kHz stereo by default so decoding must resample.
Video:   ``video(fmt, frames, fps, w, h)`` with fmt in ``VIDEO_FORMATS``. Frame ``i`` shows the
         number ``i`` in binary as vertical stripes (red = 1, blue = 0; bits 0-7 in the top half,
         8-15 in the bottom half), so ``frame_index(decoded_frame)`` tells which source frame a
         decoded frame is, and the red/blue colors prove the RGB channel order.
Helpers: ``b64(data)``, ``b64url(data)``, ``data_url(data, mime)``, ``truncated(data, fraction)``,
         ``garbage(n)``.
"""
from __future__ import annotations

import base64
import io
import math
import struct
import wave
import zlib

import av
import numpy as np
from PIL import Image

# ---------------------------------------------------------------- images


def image(fmt: str = "PNG", w: int = 32, h: int = 24, color=(255, 0, 0), mode: str = "RGB", **save) -> bytes:
    """A solid ``color`` image of ``w`` x ``h`` saved as ``fmt`` (any PIL format: PNG, JPEG, GIF, WEBP, BMP)."""
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format=fmt, **save)
    return buf.getvalue()


def png(w: int = 32, h: int = 24, color=(255, 0, 0), mode: str = "RGB") -> bytes:
    """A solid-color PNG."""
    return image("PNG", w, h, color, mode)


def jpeg(w: int = 32, h: int = 24, color=(255, 0, 0), quality: int = 95) -> bytes:
    """A solid-color JPEG (lossy: decoded values are within a few units of ``color``)."""
    return image("JPEG", w, h, color, "RGB", quality=quality)


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim ``w`` x ``h`` (CRC recomputed): a decompression
    bomb's header at ~70 bytes. Decoding its pixels would fail; the size check must come first."""
    data = bytearray(png(1, 1))
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | 5 more bytes | crc (4)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ---------------------------------------------------------------- audio

# fmt -> (container format, codec, forced sample rate or None)
AUDIO_FORMATS = {
    "wav": ("wav", "pcm_s16le", None),
    "flac": ("flac", "flac", None),
    "mp3": ("mp3", "libmp3lame", None),
    "ogg": ("ogg", "vorbis", None),       # Ogg/Vorbis (FFmpeg's native, "experimental" encoder)
    "opus": ("ogg", "libopus", 48000),    # Ogg/Opus: Opus only runs at 48 kHz (and a few lower rates)
    "m4a": ("ipod", "aac", None),         # MPEG-4 audio (.m4a, brand "M4A ")
    "webm": ("webm", "libopus", 48000),   # what browsers' MediaRecorder produces
}

AUDIO_MIME = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg",
              "opus": "audio/ogg", "m4a": "audio/mp4", "webm": "audio/webm"}


def sine(seconds: float = 1.0, rate: int = 44100, channels: int = 2, freq: float = 440.0,
         amplitude: float = 0.5) -> np.ndarray:
    """float32 samples, shape (channels, n): the same sine on every channel."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    mono = (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[None, :], channels, axis=0)


def audio(fmt: str = "wav", seconds: float = 1.0, rate: int = 44100, channels: int = 2,
          freq: float = 440.0, amplitude: float = 0.5) -> bytes:
    """A sine of ``seconds`` encoded as ``fmt`` (see ``AUDIO_FORMATS``). Opus formats use 48 kHz."""
    container_fmt, codec, forced_rate = AUDIO_FORMATS[fmt]
    rate = forced_rate or rate
    samples = sine(seconds, rate, channels, freq, amplitude)
    layout = {1: "mono", 2: "stereo"}[channels]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        fmt_name = stream.codec_context.format.name  # the encoder's preferred sample format
        # feed 1024-sample frames; an audio FIFO inside PyAV adapts them to the encoder's frame size
        step = 1024
        for start in range(0, samples.shape[1], step):
            chunk = np.ascontiguousarray(samples[:, start:start + step])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            if fmt_name != "fltp":
                frame = _convert_audio(frame, fmt_name, layout, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _convert_audio(frame, fmt_name, layout, rate):
    (converted,) = av.AudioResampler(format=fmt_name, layout=layout, rate=rate).resample(frame) or [None]
    converted.pts = frame.pts
    return converted


def wav(seconds: float = 1.0, rate: int = 44100, channels: int = 2, freq: float = 440.0,
        amplitude: float = 0.5) -> bytes:
    """A 16-bit PCM WAV sine, written with the standard ``wave`` module (``seconds=0`` gives a valid
    file with no samples)."""
    samples = sine(seconds, rate, channels, freq, amplitude)
    pcm = np.clip(np.rint(samples.T * 32767), -32768, 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buf.getvalue()


# ---------------------------------------------------------------- video

# fmt -> (container format, codec, pixel format)
VIDEO_FORMATS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mp4v": ("mp4", "mpeg4", "yuv420p"),    # MPEG-4 part 2 in MP4
    "avi": ("avi", "mpeg4", "yuv420p"),
    "mov": ("mov", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "webm_vp8": ("webm", "libvpx", "yuv420p"),
}

VIDEO_MIME = {"mp4": "video/mp4", "mp4v": "video/mp4", "avi": "video/x-msvideo", "mov": "video/quicktime",
              "webm": "video/webm", "webm_vp8": "video/webm"}

ON = (255, 0, 0)   # red stripe: bit 1
OFF = (0, 0, 255)  # blue stripe: bit 0


def index_frame(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    """(h, w, 3) uint8 RGB frame showing ``i`` in binary: 8 vertical stripes per half, LSB on the left."""
    frame = np.empty((h, w, 3), dtype=np.uint8)
    for half in range(2):
        rows = slice(half * (h // 2), (half + 1) * (h // 2) if half == 0 else h)
        for bit in range(8):
            cols = slice(bit * w // 8, (bit + 1) * w // 8)
            frame[rows, cols] = ON if (i >> (half * 8 + bit)) & 1 else OFF
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Reads back the number written by ``index_frame`` from a decoded (h, w, 3) RGB frame."""
    h, w = frame.shape[:2]
    value = 0
    for half in range(2):
        y = h // 4 + half * (h // 2)
        for bit in range(8):
            x = bit * w // 8 + w // 16
            r, _, b = (int(v) for v in frame[y, x])
            if r > b:
                value |= 1 << (half * 8 + bit)
    return value


def video(fmt: str = "mp4", frames: int = 8, fps: int = 4, w: int = 64, h: int = 48,
          fragmented: bool = False, audio_track: bool = False, bframes: int = 0, rotation: int = 0) -> bytes:
    """A clip of ``frames`` frames (frame i shows ``index_frame(i)``) at ``fps`` in ``fmt``
    (see ``VIDEO_FORMATS``). ``w`` and ``h`` must be even. ``fragmented`` writes a fragmented MP4/MOV (index first, as live recorders do).
    ``audio_track`` adds a 440 Hz AAC/Opus/MP3 track lasting the clip (MP4, MOV, WebM, AVI).
    ``bframes`` (H.264 only) reorders frames, so decode order differs from presentation order.
    ``rotation`` (MP4/MOV) stores a display rotation in degrees counter-clockwise, as phones do."""
    container_fmt, codec, pix_fmt = VIDEO_FORMATS[fmt]
    buf = io.BytesIO()
    fragmented = fragmented and container_fmt in ("mp4", "mov")
    options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if fragmented else {}
    with av.open(buf, "w", format=container_fmt, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "crf": "18"}
            if bframes:
                stream.codec_context.options = {"preset": "veryfast", "crf": "18", "bf": str(bframes)}
        if rotation:
            stream.set_display_rotation(rotation)
        elif codec.startswith("libvpx"):
            stream.codec_context.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        else:
            stream.codec_context.bit_rate = 2_000_000
        astream = None
        if audio_track:
            acodec = {"webm": "libopus", "avi": "libmp3lame"}.get(container_fmt, "aac")
            astream = out.add_stream(acodec, rate=48000, layout="mono")
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, w, h), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if astream is not None:
            n = int(48000 * frames / fps)
            samples = sine(frames / fps, 48000, 1)
            step = 960
            for start in range(0, n, step):
                chunk = np.ascontiguousarray(samples[:, start:start + step])
                f = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                f.sample_rate, f.pts = 48000, start
                if astream.codec_context.format.name != "fltp":
                    f = _convert_audio(f, astream.codec_context.format.name, "mono", 48000)
                for packet in astream.encode(f):
                    out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)
    return buf.getvalue()


# ---------------------------------------------------------------- helpers


def b64(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes, padding: bool = False) -> str:
    """URL-safe base64 (``-`` and ``_``), without padding unless asked."""
    text = base64.urlsafe_b64encode(data).decode("ascii")
    return text if padding else text.rstrip("=")


def data_url(data: bytes, mime: str = "application/octet-stream") -> str:
    """``data:<mime>;base64,<payload>``."""
    return f"data:{mime};base64,{b64(data)}"


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    """The first ``fraction`` of ``data``."""
    return data[: max(1, int(len(data) * fraction))]


def garbage(n: int = 4096, seed: int = 0) -> bytes:
    """``n`` random bytes (deterministic)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
