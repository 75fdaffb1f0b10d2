"""Client media -> model inputs. The one decoder of the server: PIL for images, PyAV for audio and video.

Everything works from bytes in memory (no temp files) and every failure is a domain error that names
the request field it came from: ``InvalidInput`` (400) for data that is not what it claims or cannot
be decoded, ``MediaTooLarge`` (a ``PayloadTooLarge``, 413) for size, pixel and duration caps.

Containers are recognised from their magic bytes (``sniff_kind`` / ``sniff_format``) and FFmpeg is then
told which demuxer to use: it never probes client bytes on its own, so playlists, image sequences and
other demuxers that open further files or URLs are never reached.

Choices worth knowing:
- Images: ``ImageOps.exif_transpose`` is applied (the picture the user saw); transparency is composited
  on white; 16-bit images are scaled to 8 bits. Multi-frame images give their first frame.
- Audio: mono (FFmpeg's downmix) float32 in [-1, 1] at the requested rate, resampled by swresample.
- Video: frames are sampled evenly over the whole clip (``linspace(0, total - 1, n)``, rounded) and
  decoded in one sequential pass that keeps only the wanted frames. An odd frame count is NOT padded:
  the Qwen video processors pad to their temporal patch size themselves. Display rotation (phone
  videos) is applied. The source frame count comes from counting packets (a demux-only pass), since
  many containers (WebM) do not store it.
- Headers first: ``probe`` reads what an item's headers say (image size; stream, frame size and
  duration of audio and video) without decoding a pixel or sample, and ``check_request_budget`` sums
  a request's probes against per-request budgets derived from the per-item caps (REQUEST_BUDGET_ITEMS).
- Truncation is rejected where the file lets us see it: FLAC, M4A/MP4/MOV (index at the end), WAV and
  AVI (RIFF size), Ogg (no end-of-stream page), WebM/MP3 (declared duration longer than what decodes),
  partial packets. An MP3 without a Xing/Info header or a raw ADTS stream cut short is just a shorter
  stream and is accepted.
"""
from __future__ import annotations

import binascii
import io
import logging
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field as dataclass_field

import av
import numpy as np
from PIL import Image, ImageOps

from utils.errors import InvalidInput, PayloadTooLarge, ServerError
from utils.media.options import frame_count

log = logging.getLogger(__name__)

__all__ = [
    "MediaLimits", "MediaProbe", "MediaTooLarge", "VideoClip", "check_request_budget", "decode_base64", "load_image",
    "load_audio", "load_video", "probe", "sample_indices", "sniff_kind", "sniff_format",
]

# A clip may not hold more frames than this many per second of its (capped) duration: bounds the
# sequential decode of files whose timestamps lie (a "1 s" clip of a million frames).
MAX_SOURCE_FPS = 240

# The per-request budgets derive from the per-item caps instead of adding settings of their own: the
# media of one request together may hold at most this many items' worth of pixels, audio seconds and
# video seconds (with the defaults: 160 M pixels, 40 min of audio, 40 min of video). Counts per kind
# are capped per model (max_images...), so this bounds what a request can make the server decode.
REQUEST_BUDGET_ITEMS = 4


@dataclass(frozen=True)
class MediaLimits:
    max_media_bytes: int = 32 * 2**20     # per item after base64 decoding
    max_image_pixels: int = 40_000_000    # decompression-bomb cap (w*h), checked before decoding pixels
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 8             # frames sampled from a clip
    audio_sampling_rate: int = 16_000

    @property
    def max_request_pixels(self) -> int:
        """Pixels of all images and kept video frames of one request (see REQUEST_BUDGET_ITEMS)."""
        return REQUEST_BUDGET_ITEMS * self.max_image_pixels

    @property
    def max_request_audio_seconds(self) -> float:
        return REQUEST_BUDGET_ITEMS * self.max_audio_seconds

    @property
    def max_request_video_seconds(self) -> float:
        return REQUEST_BUDGET_ITEMS * self.max_video_seconds


class MediaTooLarge(PayloadTooLarge):
    """413 for one media item; like ``InvalidInput`` it names the field."""


# ---------------------------------------------------------------- sniffing

_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")    # what PIL may open
_AUDIO_ONLY = {"wav", "flac", "mp3", "ogg", "m4a", "aac"}
_VIDEO_CONTAINERS = {"mp4", "mov", "avi", "webm"}
# label -> FFmpeg demuxer
_DEMUXERS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "aac": "aac", "ogg": "ogg", "m4a": "mov",
             "mp4": "mov", "mov": "mov", "avi": "avi", "webm": "matroska"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}


def sniff_format(data: bytes) -> str | None:
    """Format label from magic bytes: png jpeg gif webp bmp tiff | wav flac mp3 aac ogg m4a |
    mp4 mov avi webm (WebM and Matroska alike) | None."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"RIFF") and len(head) >= 12:
        return {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}.get(head[8:12])
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3"):
        return "mp3"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AUDIO_BRANDS:
            return "m4a"
        return "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free"):   # QuickTime without ftyp
        return "mov"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:   # MPEG audio frame sync
        layer = (head[1] >> 1) & 3
        return "aac" if layer == 0 else "mp3"   # ADTS has layer bits 00
    return None


def sniff_kind(data: bytes) -> str | None:
    """"image" | "audio" | "video" | None from magic bytes (for clear error messages and routing).
    WebM/Matroska and non-M4A MP4 count as video although they may hold audio only."""
    label = sniff_format(data)
    if label is None:
        return None
    if label in _DEMUXERS:
        return "audio" if label in _AUDIO_ONLY else "video"
    return "image"


def _wrong_kind(expected: str, data: bytes) -> str:
    """`expected`: image, audio or video."""
    label = sniff_format(data)
    if label is None:
        return f"not a recognised {expected} format"
    return f"expected {expected} data but got {sniff_kind(data)} data ({label})"


# ---------------------------------------------------------------- base64


def decode_base64(value: object, field: str, max_bytes: int) -> bytes:
    """Plain base64 (standard or URL-safe alphabet, padding optional, whitespace ignored) or a data URL
    ``data:<mime>;base64,<payload>`` -> bytes. The MIME type is not trusted: loaders sniff the bytes."""
    if not isinstance(value, str):
        raise InvalidInput(f"must be a base64 string, got {type(value).__name__}", field=field)
    if len(value) > 2 * max_bytes + 4096:   # ~4/3 of max_bytes plus generous whitespace
        raise MediaTooLarge(f"media is larger than the limit of {max_bytes} bytes", field=field)
    text = value.strip()
    if text[:5].lower() == "data:":
        header, sep, text = text.partition(",")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if not sep or "base64" not in params[1:]:
            raise InvalidInput("data URL must have the form data:<mime>;base64,<payload>", field=field)
    if not text.isascii():
        raise InvalidInput("invalid base64: non-ASCII characters", field=field)
    if any(c in text for c in " \t\r\n\f\v"):
        text = "".join(text.split())
    if not text:
        raise InvalidInput("media is empty", field=field)
    if ("-" in text or "_" in text):
        if "+" in text or "/" in text:
            raise InvalidInput("invalid base64: mixes the standard and URL-safe alphabets", field=field)
        text = text.translate(str.maketrans("-_", "+/"))
    body = text.rstrip("=")
    if len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise InvalidInput("invalid base64: bad length or padding", field=field)
    if len(body) * 3 // 4 > max_bytes:
        raise MediaTooLarge(f"media is larger than the limit of {max_bytes} bytes", field=field)
    try:
        raw = binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error as exc:
        raise InvalidInput(f"invalid base64: {exc}", field=field) from None
    if not raw:
        raise InvalidInput("media is empty", field=field)
    return raw


def _check_bytes(data: bytes, field: str, limits: MediaLimits) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"media must be bytes, got {type(data).__name__}", field=field)
    if len(data) == 0:
        raise InvalidInput("media is empty", field=field)
    if len(data) > limits.max_media_bytes:
        raise MediaTooLarge(
            f"media is {len(data)} bytes; the limit is {limits.max_media_bytes}", field=field)


def _accept(data: bytes, field: str, limits: MediaLimits, kind: str, formats) -> tuple[bytes, str]:
    """Size, kind and completeness checks shared by the audio and video loaders."""
    _check_bytes(data, field, limits)
    label = sniff_format(data)
    if label not in formats:
        raise InvalidInput(_wrong_kind(kind, data), field=field)
    data = bytes(data)
    _check_container_complete(data, label, field, kind)
    return data, label


# ---------------------------------------------------------------- images


def load_image(data: bytes, field: str, limits: MediaLimits) -> Image.Image:
    """Bytes of a PNG/JPEG/GIF/WEBP/BMP/TIFF -> RGB ``PIL.Image`` (EXIF orientation applied).
    The pixel count is checked from the header, before any pixel is decoded."""
    image = _open_image(data, field, limits)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise MediaTooLarge(f"image too large (decompression bomb): {exc}", field=field) from None
    except Exception:
        raise InvalidInput(f"could not decode the {sniff_format(data) or 'image'} image: corrupt or truncated",
                           field=field) from None


def _open_image(data: bytes, field: str, limits: MediaLimits) -> Image.Image:
    """The image with its header read and its size checked; no pixel decoded yet."""
    _check_bytes(data, field, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise MediaTooLarge(f"image too large (decompression bomb): {exc}", field=field) from None
    except Exception:   # PIL raises UnidentifiedImageError, OSError, SyntaxError, struct.error...
        raise InvalidInput(_wrong_kind("image", data) if sniff_kind(data) != "image"
                           else f"could not read the {sniff_format(data)} image: corrupt or truncated",
                           field=field) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an invalid size {width}x{height}", field=field)
    if width * height > limits.max_image_pixels:
        raise MediaTooLarge(f"image is {width}x{height} = {width * height} pixels; "
                            f"the limit is {limits.max_image_pixels}", field=field)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):   # 16-bit and float grayscale
        arr = np.asarray(image, dtype=np.float64)
        if mode != "F":
            arr = arr / 257.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info) \
            or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- shared PyAV helpers

_AV_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, IndexError, RuntimeError, struct.error)


@contextmanager
def _decoding(field: str, what: str, label: str | None):
    """Maps any decoder failure on client bytes to InvalidInput (our own errors pass through)."""
    try:
        yield
    except ServerError:
        raise
    except _AV_ERRORS as exc:
        log.debug("decoding %s (%s) for %s failed: %r", what, label, field, exc)
        raise InvalidInput(f"could not decode the {what} ({label}): corrupt or truncated data",
                           field=field) from None


def _open(data: bytes, label: str):
    return av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[label], metadata_errors="ignore")


def _truncated(field: str, what: str, label: str, why: str) -> InvalidInput:
    return InvalidInput(f"the {what} ({label}) is truncated or corrupt: {why}", field=field)


def _check_container_complete(data: bytes, label: str, field: str, what: str) -> None:
    """Truncation checks that FFmpeg does not make: RIFF size (WAV, AVI) and Ogg's end-of-stream page."""
    if label in ("wav", "avi") and len(data) >= 8:
        (riff_size,) = struct.unpack_from("<I", data, 4)
        if riff_size not in (0, 0xFFFFFFFF) and riff_size + 8 > len(data):
            raise _truncated(field, what, label, f"header announces {riff_size + 8} bytes, got {len(data)}")
    elif label == "ogg":
        pos = data.rfind(b"OggS")
        if pos < 0 or pos + 27 > len(data):
            raise _truncated(field, what, label, "incomplete Ogg page")
        segments = data[pos + 26]
        table = data[pos + 27:pos + 27 + segments]
        if len(table) < segments or pos + 27 + segments + sum(table) > len(data):
            raise _truncated(field, what, label, "incomplete last Ogg page")
        if not data[pos + 5] & 0x04:
            raise _truncated(field, what, label, "no end-of-stream page")


def _mp3_has_length_header(data: bytes) -> bool:
    """True when an MP3 carries a Xing/Info/VBRI header, i.e. its duration is known, not estimated."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9]
        start = 10 + size
    window = data[start:start + 4096]
    return any(tag in window for tag in (b"Xing", b"Info", b"VBRI"))


def _declared_seconds(data: bytes, label: str, stream, container) -> float | None:
    """Duration the file claims, only where it is stored rather than estimated from the bitrate."""
    if label == "aac" or (label == "mp3" and not _mp3_has_length_header(data)):
        return None
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _stream(container, kind: str, label: str, field: str):
    """The container's first audio or video stream, with a decoder."""
    streams = container.streams.audio if kind == "audio" else container.streams.video
    if not streams:
        raise InvalidInput(f"no {kind} stream in the {label} data", field=field)
    stream = streams[0]
    if stream.codec_context is None:
        raise InvalidInput(f"the {label} {kind} stream has no decoder here (unknown codec or corrupt header)",
                           field=field)
    return stream


def _check_declared(declared: float | None, max_seconds: float, field: str, what: str) -> None:
    if declared is not None and declared > max_seconds + 0.5:
        raise MediaTooLarge(f"{what} is {declared:.1f} s long; the limit is {max_seconds:g} s", field=field)


def _check_frame_size(stream, field: str, limits: MediaLimits) -> tuple[int, int]:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_image_pixels:
        raise MediaTooLarge(f"video frames are {width}x{height} = {width * height} pixels; "
                            f"the limit is {limits.max_image_pixels}", field=field)
    return width, height


def _header_seconds(stream, container) -> float:
    """Duration from the headers, estimates included (an MP3 without a length header): for budgets,
    not for truncation checks. 0.0 when the headers do not tell."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return 0.0


def _check_not_short(declared: float | None, observed: float, frame_seconds: float,
                     field: str, what: str, label: str) -> None:
    if declared is None or declared <= 0:
        return
    tolerance = max(0.1, 0.02 * declared, 2 * frame_seconds)
    if declared - observed > tolerance:
        raise _truncated(field, what, label,
                         f"it declares {declared:.2f} s but only {observed:.2f} s could be read")


# ---------------------------------------------------------------- audio


def load_audio(data: bytes, field: str, limits: MediaLimits, sampling_rate: int | None = None) -> np.ndarray:
    """WAV/FLAC/MP3/Ogg (Vorbis, Opus)/M4A (AAC)/WebM audio, or the audio track of an MP4/MOV/AVI ->
    1-D float32 mono waveform in [-1, 1] at ``sampling_rate`` (default ``limits.audio_sampling_rate``)."""
    rate = int(sampling_rate or limits.audio_sampling_rate)
    if rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {rate}")
    data, label = _accept(data, field, limits, "audio", _DEMUXERS)
    max_seconds = limits.max_audio_seconds
    with _decoding(field, "audio", label), _open(data, label) as container:
        stream = _stream(container, "audio", label, field)
        declared = _declared_seconds(data, label, stream, container)
        _check_declared(declared, max_seconds, field, "audio")
        chunks: list[np.ndarray] = []
        decoded_seconds = 0.0
        resampler, setup = None, None
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise _truncated(field, "audio", label, "partial packet")
            for frame in packet.decode():
                if not frame.samples:
                    continue
                decoded_seconds += frame.samples / frame.sample_rate
                if decoded_seconds > max_seconds + 0.5:
                    raise MediaTooLarge(f"audio is longer than the limit of {max_seconds:g} s", field=field)
                frame_setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                if frame_setup != setup:   # a chained Ogg may change rate or channels mid-file
                    if resampler is not None:
                        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
                    resampler = _mono_resampler(rate)
                    setup = frame_setup
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        if resampler is not None:
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        _check_not_short(declared, decoded_seconds, 0.0, field, "audio", label)
    if not chunks or not sum(len(c) for c in chunks):
        raise InvalidInput(f"the {label} data holds no audio samples", field=field)
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    np.nan_to_num(wave, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(wave, -1.0, 1.0, out=wave)
    return wave


def _mono_resampler(rate: int) -> av.AudioResampler:
    # rematrix_maxval=1 normalises the downmix so channels are averaged: swresample's default
    # (each stereo channel x 1/sqrt(2)) would push loud identical channels past full scale.
    return av.AudioResampler(format="flt", layout="mono", rate=rate, options={"rematrix_maxval": "1.0"})


# ---------------------------------------------------------------- video


@dataclass
class VideoClip:
    """Frames sampled from a clip. ``frames``: (T, H, W, 3) uint8 RGB, 1 <= T <= max_video_frames, not
    padded to an even T (the processors do that). ``fps``, ``duration`` and ``total_frames`` describe
    the source; ``frame_indices`` are the source frames kept, in order."""

    frames: np.ndarray
    fps: float
    duration: float
    total_frames: int
    frame_indices: list[int] = dataclass_field(default_factory=list)

    def metadata(self):
        """``transformers.video_utils.VideoMetadata`` for ``processor(videos=[clip.frames],
        video_metadata=[clip.metadata()])`` (the convention of transformers' own pyav loader)."""
        from transformers.video_utils import VideoMetadata  # deferred: transformers

        return VideoMetadata(
            total_num_frames=self.total_frames, fps=self.fps, duration=self.duration,
            video_backend="pyav", frames_indices=list(self.frame_indices),
            height=int(self.frames.shape[1]), width=int(self.frames.shape[2]),
        )


MAX_GIVEN_FRAMES = 256  # frames a client may send as one video (they are sampled down to max_video_frames)


def video_from_frames(images: list[Image.Image], field: str, limits: MediaLimits, fps: float = 2.0,
                      options: dict | None = None) -> VideoClip:
    """A video sent as its frames (images of one size, in order, `fps` apart): sampled evenly like a
    decoded clip (`options`: a request's fps / nframes, utils/media/options.py)."""
    if not images:
        raise InvalidInput("a video needs at least one frame", field=field)
    size = images[0].size
    for i, image in enumerate(images):
        if image.size != size:
            raise InvalidInput(f"frame {i} is {image.size[0]}x{image.size[1]}; every frame of one video must have "
                               f"the first frame's size {size[0]}x{size[1]}", field=f"{field}[{i}]")
    keep = sample_indices(len(images), frame_count(options, len(images), len(images) / fps, limits.max_video_frames))
    return VideoClip(frames=np.stack([np.asarray(images[i]) for i in keep]), fps=fps, duration=len(images) / fps,
                     total_frames=len(images), frame_indices=keep)


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` source frame indices spread evenly over ``range(total)``, first and last included."""
    count = max(1, min(count, total))
    if count == 1:
        return [0]
    return [int(math.floor(i * (total - 1) / (count - 1) + 0.5)) for i in range(count)]


def load_video(data: bytes, field: str, limits: MediaLimits, options: dict | None = None) -> VideoClip:
    """MP4/MOV (H.264, MPEG-4 and what FFmpeg decodes), AVI, WebM/MKV (VP8, VP9) -> ``VideoClip`` with up to
    ``limits.max_video_frames`` frames sampled evenly over the whole clip (fewer where the request's
    ``options`` ask for fewer: fps or nframes, utils/media/options.py)."""
    data, label = _accept(data, field, limits, "video", _VIDEO_CONTAINERS)
    with _decoding(field, "video", label):
        scan = _scan_video(data, label, field, limits)
        total = scan["packets"]
        fps = scan["fps"] or (total / scan["span"] if scan["span"] > 0 else 0.0)
        seconds = scan["span"] if scan["span"] > 0 else (total / fps if fps else 0.0)
        count = frame_count(options, total, seconds, limits.max_video_frames)
        wanted = sample_indices(total, count)
        frames, decoded = _decode_frames(data, label, wanted, field, limits)
        if frames is None:   # fewer frames decoded than packets: sample again from what decodes
            if decoded == 0:
                raise InvalidInput(f"no decodable video frames in the {label} data", field=field)
            total = decoded
            wanted = sample_indices(total, count)
            frames, _ = _decode_frames(data, label, wanted, field, limits)
            if frames is None:
                raise InvalidInput(f"the {label} video decodes differently on each pass", field=field)
    fps = scan["fps"] or (total / scan["span"] if scan["span"] > 0 else 0.0)
    duration = scan["span"] if scan["span"] > 0 else (total / fps if fps else 0.0)
    return VideoClip(frames=frames, fps=float(fps), duration=float(duration), total_frames=int(total),
                     frame_indices=wanted)


def _scan_video(data: bytes, label: str, field: str, limits: MediaLimits) -> dict:
    """Demux-only pass: counts the video packets, measures the span, checks caps and truncation."""
    max_seconds = limits.max_video_seconds
    with _open(data, label) as container:
        stream = _stream(container, "video", label, field)
        _check_frame_size(stream, field, limits)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        declared = _declared_seconds(data, label, stream, container)
        _check_declared(declared, max_seconds, field, "video")
        max_packets = int(max(max_seconds, 1.0) * MAX_SOURCE_FPS)
        tb = float(stream.time_base or 0)
        packets, start, end, stream_end = 0, None, None, 0.0
        for packet in container.demux():
            if packet.size == 0:
                continue
            if packet.is_corrupt:
                raise _truncated(field, "video", label, "partial packet")
            if packet.pts is not None and packet.time_base:
                p_end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                stream_end = max(stream_end, p_end)
            if packet.stream.index != stream.index:
                continue
            packets += 1
            if packets > max_packets:
                raise MediaTooLarge(f"video has more than {max_packets} frames", field=field)
            if packet.pts is not None and tb:
                t0 = packet.pts * tb
                t1 = (packet.pts + (packet.duration or 0)) * tb
                if not packet.duration and fps:
                    t1 = t0 + 1.0 / fps
                start = t0 if start is None else min(start, t0)
                end = t1 if end is None else max(end, t1)
                if end - start > max_seconds + 0.5:
                    raise MediaTooLarge(f"video is longer than the limit of {max_seconds:g} s", field=field)
        if packets == 0:
            raise InvalidInput(f"no video frames in the {label} data", field=field)
        span = (end - start) if start is not None else 0.0
        frame_seconds = 1.0 / fps if fps else 0.0
        if stream.duration and stream.time_base:
            _check_not_short(declared, span, frame_seconds, field, "video", label)
        elif declared is not None:   # container-wide duration (WebM): compare with every stream's end
            _check_not_short(declared, stream_end - max(0.0, (container.start_time or 0) / av.time_base),
                             frame_seconds, field, "video", label)
        if stream.frames and packets < stream.frames - max(1, 0.02 * stream.frames):
            raise _truncated(field, "video", label, f"it declares {stream.frames} frames but holds {packets}")
    return {"packets": packets, "fps": fps, "span": span}


def _decode_frames(data: bytes, label: str, wanted: list[int], field: str, limits: MediaLimits):
    """Decodes sequentially, keeping frames whose presentation index is in ``wanted``.
    Returns (frames, decoded_count); frames is None when the stream ended before the last wanted one."""
    keep = set(wanted)
    last = wanted[-1]
    kept: list[np.ndarray] = []
    size = None
    decoded = 0
    with _open(data, label) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            index = decoded
            decoded += 1
            if index not in keep:
                continue
            if size is None:
                size = (frame.width, frame.height)
                if size[0] * size[1] > limits.max_image_pixels:
                    raise MediaTooLarge(f"video frames are {size[0]}x{size[1]} pixels; "
                                        f"the limit is {limits.max_image_pixels}", field=field)
            if (frame.width, frame.height) != size:   # resolution changed mid-stream
                frame = frame.reformat(width=size[0], height=size[1])
            array = frame.to_ndarray(format="rgb24")
            turns = int(round((frame.rotation or 0) / 90.0)) % 4
            if turns:
                array = np.ascontiguousarray(np.rot90(array, turns))   # counter-clockwise, as FFmpeg displays
            kept.append(array)
            if index == last:
                break
    if len(kept) < len(wanted):
        return None, decoded
    return np.stack(kept), decoded


# ---------------------------------------------------------------- headers only: probes and the request budget


@dataclass(frozen=True)
class MediaProbe:
    """What one item's headers say, read before any pixel or sample is decoded. ``pixels`` counts what
    decoding will hold: the image, every frame of a video sent as frames, or the frames kept from a
    video file. ``seconds`` is 0.0 where the headers do not tell (the loaders still enforce the
    per-item caps while they decode)."""

    kind: str      # image | audio | video
    field: str
    width: int = 0
    height: int = 0
    frames: int = 0
    seconds: float = 0.0

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def probe(kind: str, data, field: str, limits: MediaLimits) -> MediaProbe:
    """Headers of one item, its per-item caps checked; nothing is decoded. ``data``: bytes, or for a
    video sent as its frames, the list of each frame's image bytes."""
    if kind == "image":
        width, height = _open_image(data, field, limits).size
        return MediaProbe("image", field, width, height, frames=1)
    if kind == "audio":
        data, label = _accept(data, field, limits, "audio", _DEMUXERS)
        with _decoding(field, "audio", label), _open(data, label) as container:
            stream = _stream(container, "audio", label, field)
            _check_declared(_declared_seconds(data, label, stream, container), limits.max_audio_seconds, field,
                            "audio")
            return MediaProbe("audio", field, seconds=_header_seconds(stream, container))
    if isinstance(data, list):
        return _probe_frames(data, field, limits)
    data, label = _accept(data, field, limits, "video", _VIDEO_CONTAINERS)
    with _decoding(field, "video", label), _open(data, label) as container:
        stream = _stream(container, "video", label, field)
        width, height = _check_frame_size(stream, field, limits)
        _check_declared(_declared_seconds(data, label, stream, container), limits.max_video_seconds, field, "video")
        kept = min(stream.frames, limits.max_video_frames) if stream.frames else limits.max_video_frames
        return MediaProbe("video", field, width, height, frames=kept, seconds=_header_seconds(stream, container))


def _probe_frames(frames: list, field: str, limits: MediaLimits) -> MediaProbe:
    """A video sent as its frames: every frame is decoded, so every frame counts; one size for all is
    checked here, before a frame is decoded."""
    if not frames:
        raise InvalidInput("a video needs at least one frame", field=field)
    size = None
    for i, data in enumerate(frames):
        frame_size = _open_image(data, f"{field}[{i}]", limits).size
        size = size or frame_size
        if frame_size != size:
            raise InvalidInput(f"frame {i} is {frame_size[0]}x{frame_size[1]}; every frame of one video must have "
                               f"the first frame's size {size[0]}x{size[1]}", field=f"{field}[{i}]")
    return MediaProbe("video", field, size[0], size[1], frames=len(frames))


def check_request_budget(probes: list[MediaProbe], limits: MediaLimits) -> None:
    """Refuses (413, naming the item that goes over) media that together exceed the per-request
    budgets (see REQUEST_BUDGET_ITEMS), from their probes: before any of them is decoded."""
    pixels, seconds = 0, {"audio": 0.0, "video": 0.0}
    budget = {"audio": limits.max_request_audio_seconds, "video": limits.max_request_video_seconds}
    for item in probes:
        pixels += item.pixels
        if pixels > limits.max_request_pixels:
            raise MediaTooLarge(f"the request's images and video frames hold {pixels} pixels up to this item; "
                                f"the limit per request is {limits.max_request_pixels}", field=item.field)
        if item.kind in seconds:
            seconds[item.kind] += item.seconds
            if seconds[item.kind] > budget[item.kind]:
                raise MediaTooLarge(f"the request's {item.kind} lasts {seconds[item.kind]:.1f} s up to this item; "
                                    f"the limit per request is {budget[item.kind]:g} s", field=item.field)
