"""One image loader for every source (path, ``file://``, data URL, http(s), bytes, PIL), with limits.

Every image that enters VisualChat goes through :func:`load_image`, so the limits on encoded
size, pixel count and remote/local access are enforced in one place, and every failure is an
:class:`ImageError` whose message names the offending input and the limit it broke. The pixel
limit is checked on the header (``Image.open(...).size``) before any pixels are decoded, which is
what stops decompression bombs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | Image.Image

REMOTE_TIMEOUT_S = 10.0
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_WHITESPACE = re.compile(r"\s+")
# Raster formats a chat image can reasonably be. An allowlist because some Pillow plugins are not
# safe on untrusted input (EPS shells out to Ghostscript).
# JPEG covers MPO; AVIF is used only where this Pillow build has it.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "PPM")
# Bytes in a base64 payload of n characters are at most 3n/4; used to refuse before decoding.
_BASE64_RATIO = 3 / 4


@dataclass(frozen=True)
class ImageLimits:
    """What :func:`load_image` accepts. The HTTP API builds one with ``allow_local_files=False``."""

    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 36_000_000  # width * height, checked on the header before decoding
    max_images: int = 16  # per conversation
    allow_remote: bool = False  # fetch http(s) URLs (urllib, 10 s timeout)
    allow_local_files: bool = True  # filesystem paths and file:// URLs

    def __post_init__(self) -> None:
        for field_name in ("max_bytes", "max_pixels", "max_images"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{field_name} must be a positive int, got {value!r}")
        for field_name in ("allow_remote", "allow_local_files"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise ValueError(f"ImageLimits.{field_name} must be True or False, got {value!r}")


DEFAULT_LIMITS = ImageLimits()


class ImageError(ValueError):
    """A bad or over-limit image; the message names the input and the limit."""


def load_image(
    source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS, *, name: str | None = None
) -> Image.Image:
    """Load ``source`` as a fully decoded RGB image, EXIF orientation applied.

    ``source`` is a PIL image, encoded bytes, a path (``str`` or ``os.PathLike``), a ``file://``
    URL, a ``data:`` URL or an ``http(s)://`` URL. ``name`` is used in error messages instead of
    a description of the source (e.g. the upload's file name).
    """
    label = name or describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, label, limits)
        return _to_rgb(source, label)
    if isinstance(source, bytes | bytearray | memoryview):
        _check_bytes(len(source), label, limits)
        return _decode(bytes(source), label, limits)
    if isinstance(source, os.PathLike):
        return _decode(_read_file(Path(source), label, limits), label, limits)
    if isinstance(source, str):
        return _decode(_read_str(source, label, limits), label, limits)
    raise ImageError(
        f"{label}: unsupported image source type {type(source).__name__} "
        "(expected a path, file:// / data: / http(s):// URL, bytes or PIL image)"
    )


def image_digest(image: Image.Image) -> str:
    """sha256 hex over mode, size and pixels: equal digests mean equal images, however loaded."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def check_image_count(num_images: int, limits: ImageLimits) -> None:
    """Refuse a conversation with more than ``limits.max_images`` images."""
    if num_images > limits.max_images:
        raise ImageError(
            f"too many images: {num_images} (max {limits.max_images} per conversation; "
            "ImageLimits.max_images)"
        )


def describe_source(source: object) -> str:
    """A short, log-safe description of a source for error messages."""
    if isinstance(source, Image.Image):
        return f"PIL image ({source.width}x{source.height} {source.mode})"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"bytes ({len(source)} bytes)"
    if isinstance(source, str) and source[:5].lower() == "data:":
        return f"data URL ({len(source)} bytes)"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return type(source).__name__


def _read_str(source: str, label: str, limits: ImageLimits) -> bytes:
    """Encoded bytes of a string source: data URL, http(s) URL, file:// URL or path."""
    if source[:5].lower() == "data:":
        return _read_data_url(source, label, limits)
    match = _URL_SCHEME.match(source)
    scheme = match.group(1).lower() if match else None
    if scheme in ("http", "https"):
        return _read_remote(source, label, limits)
    if scheme == "file":
        parsed = urllib.parse.urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"{label}: file:// URLs must name a local file (no host)")
        return _read_file(Path(urllib.request.url2pathname(parsed.path)), label, limits)
    if scheme is not None:
        raise ImageError(
            f"{label}: unsupported URL scheme {scheme!r} (use data:, file:// or http(s)://)"
        )
    return _read_file(Path(source), label, limits)


def _read_data_url(url: str, label: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError(f"{label}: malformed data URL (no ',' before the payload)")
    is_base64 = "base64" in (p.strip().lower() for p in header.split(";"))
    if not is_base64:
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        payload = _WHITESPACE.sub("", payload)
        if len(payload) * _BASE64_RATIO > limits.max_bytes + 3:
            _raise_too_big(label, int(len(payload) * _BASE64_RATIO), limits)
        payload += "=" * (-len(payload) % 4)  # tolerate stripped padding
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ImageError(f"{label}: invalid base64 in data URL ({exc})") from exc
    _check_bytes(len(data), label, limits)
    return data


def _read_remote(url: str, label: str, limits: ImageLimits) -> bytes:
    if not limits.allow_remote:
        raise ImageError(
            f"remote image URLs are disabled; {label} was not fetched "
            "(send the image inline as a data URL, or enable ImageLimits.allow_remote)"
        )
    logger.info("fetching remote image %s", url)
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageError(f"{label}: could not fetch image ({exc})") from exc
    _check_bytes(len(data), label, limits)
    return data


def _read_file(path: Path, label: str, limits: ImageLimits) -> bytes:
    if not limits.allow_local_files:
        raise ImageError(
            f"local image files are disabled; {label} was not read "
            "(send the image inline as a data URL; ImageLimits.allow_local_files=False)"
        )
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"{label}: not a regular file")
        _check_bytes(size, label, limits)
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: image file not found") from exc
    except OSError as exc:
        raise ImageError(f"{label}: could not read image file ({exc.strerror or exc})") from exc
    _check_bytes(len(data), label, limits)  # the file may have grown since stat()
    return data


def _decode(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=_available_formats()) as image:
            _check_pixels(image.size, label, limits)
            image.load()  # force the decode here so corrupt/truncated data fails inside the try
            return _to_rgb(image, label)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{label}: too many pixels ({exc}; max {limits.max_pixels} pixels, "
            "ImageLimits.max_pixels)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{label}: not an image, or an unsupported format ({len(data)} bytes; "
            f"supported: {', '.join(_available_formats())})"
        ) from exc
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc


@functools.cache
def _available_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so OPEN lists what this build can read
    return tuple(fmt for fmt in IMAGE_FORMATS if fmt in Image.OPEN)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """EXIF-upright RGB copy; transparency is composited onto white."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG/TIFF): keep the top 8 bits; convert("RGB") would clip to white.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("RGB")


def _check_bytes(num_bytes: int, label: str, limits: ImageLimits) -> None:
    if num_bytes > limits.max_bytes:
        _raise_too_big(label, num_bytes, limits)


def _raise_too_big(label: str, num_bytes: int, limits: ImageLimits) -> None:
    raise ImageError(
        f"{label}: image too large: {num_bytes} bytes (max {limits.max_bytes} bytes, "
        "ImageLimits.max_bytes)"
    )


def _check_pixels(size: tuple[int, int], label: str, limits: ImageLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{label}: too many pixels: {width}x{height} = {width * height} "
            f"(max {limits.max_pixels} pixels, ImageLimits.max_pixels)"
        )
