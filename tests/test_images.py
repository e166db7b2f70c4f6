import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from visualchat import images
from visualchat.images import (
    ImageError,
    ImageLimits,
    check_image_count,
    image_digest,
    load_image,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def make_image(colors: list[tuple[int, ...]], size: tuple[int, int], mode: str = "RGB"):
    """An image of ``size`` whose pixels, row by row, are ``colors``."""
    image = Image.new(mode, size)
    image.putdata(colors)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is rewritten (with a valid CRC) to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("1", (1, 1))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.fixture
def rgb_image() -> Image.Image:
    return make_image([RED, GREEN, BLUE, WHITE, RED, GREEN], (3, 2))


@pytest.fixture
def png_path(tmp_path: Path, rgb_image: Image.Image) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(rgb_image))
    return path


# --- every source kind ------------------------------------------------------------------------


@pytest.mark.parametrize("as_type", [str, Path, lambda p: p.as_uri()], ids=["str", "Path", "uri"])
def test_loads_path_kinds(png_path: Path, rgb_image: Image.Image, as_type) -> None:
    image = load_image(as_type(png_path))
    assert (image.mode, image.size) == ("RGB", (3, 2))
    assert pixels(image) == pixels(rgb_image)


def test_loads_bytes(rgb_image: Image.Image) -> None:
    assert pixels(load_image(encode(rgb_image))) == pixels(rgb_image)
    assert pixels(load_image(bytearray(encode(rgb_image)))) == pixels(rgb_image)


@pytest.mark.parametrize(
    "template",
    [
        "data:image/png;base64,{b64}",
        "data:;base64,{b64}",
        "DATA:image/png;base64,{b64}",
        "data:image/png;base64,\n  {b64_wrapped}\n",
        "data:image/png;base64,{b64_unpadded}",
    ],
    ids=["plain", "no-mime", "upper-scheme", "whitespace", "no-padding"],
)
def test_loads_data_url(rgb_image: Image.Image, template: str) -> None:
    b64 = base64.b64encode(encode(rgb_image)).decode()
    wrapped = "\n".join(b64[i : i + 20] for i in range(0, len(b64), 20))
    url = template.format(b64=b64, b64_wrapped=wrapped, b64_unpadded=b64.rstrip("="))
    assert pixels(load_image(url)) == pixels(rgb_image)


def test_bad_base64_is_an_image_error() -> None:
    with pytest.raises(ImageError, match=r"^data URL \(29 bytes\): invalid base64 in data URL"):
        load_image("data:image/png;base64,ab$%cd!")


def test_jpeg_and_cmyk_and_grey_become_rgb() -> None:
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert pixels(load_image(cmyk)) == [RED] * 4
    grey = load_image(encode(Image.new("L", (2, 1), 77)))
    assert (grey.mode, pixels(grey)) == ("RGB", [(77, 77, 77)] * 2)
    jpeg = load_image(encode(Image.new("RGB", (8, 8), (0, 0, 0)), "JPEG", quality=95))
    assert (jpeg.mode, jpeg.size, jpeg.getpixel((4, 4))) == ("RGB", (8, 8), (0, 0, 0))


def test_sixteen_bit_grey_keeps_its_top_byte() -> None:
    image = Image.new("I;16", (2, 1))
    image.putdata([0x8000, 0xFFFF])
    assert pixels(load_image(encode(image))) == [(128, 128, 128), (255, 255, 255)]


def test_rgba_is_composited_on_white() -> None:
    rgba = make_image([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)], (3, 1), "RGBA")
    image = load_image(rgba)
    assert image.mode == "RGB"
    assert pixels(image) == [WHITE, BLUE, (127, 127, 127)]
    assert rgba.mode == "RGBA"  # the caller's image is not modified


def test_palette_images(tmp_path: Path) -> None:
    palette = make_image([RED, GREEN], (2, 1)).convert("P")
    assert pixels(load_image(encode(palette))) == [RED, GREEN]
    transparent = palette.copy()
    transparent.info["transparency"] = transparent.getpixel((0, 0))
    path = tmp_path / "transparent.png"
    transparent.save(path)
    assert pixels(load_image(path)) == [WHITE, GREEN]


def test_exif_orientation_is_applied(rgb_image: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    image = load_image(encode(rgb_image, "PNG", exif=exif))
    assert image.size == (2, 3)
    # Clockwise rotation: the stored bottom-left pixel (WHITE) becomes the top-left one.
    assert pixels(image) == [WHITE, RED, RED, GREEN, GREEN, BLUE]


# --- failures name the input and the limit -----------------------------------------------------


def test_corrupt_bytes() -> None:
    with pytest.raises(ImageError, match=r"^bytes \(12 bytes\): not an image") as info:
        load_image(b"not an image")
    assert "PNG, JPEG" in str(info.value)


def test_name_replaces_the_description() -> None:
    with pytest.raises(ImageError, match=r"^upload\.png: not an image"):
        load_image(b"junk", name="upload.png")


def test_truncated_file(tmp_path: Path) -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    data = encode(noisy)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"^{path}: corrupt or truncated image"):
        load_image(path)


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is text")
    with pytest.raises(ImageError, match=rf"^{path}: not an image, or an unsupported format"):
        load_image(str(path))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=rf"^{missing}: image file not found$"):
        load_image(missing)
    with pytest.raises(ImageError, match=rf"^{tmp_path}: not a regular file$"):
        load_image(tmp_path)


def test_over_max_bytes(png_path: Path, rgb_image: Image.Image) -> None:
    data = encode(rgb_image)
    limits = ImageLimits(max_bytes=50)
    expected = rf"image too large: {len(data)} bytes \(max 50 bytes, ImageLimits.max_bytes\)$"
    with pytest.raises(ImageError, match=rf"^bytes \({len(data)} bytes\): {expected}"):
        load_image(data, limits)
    with pytest.raises(ImageError, match=rf"^{png_path}: {expected}"):
        load_image(png_path, limits)
    with pytest.raises(ImageError, match=r"^data URL \(\d+ bytes\): image too large"):
        load_image("data:image/png;base64," + base64.b64encode(data).decode(), limits)


def test_over_max_pixels_checked_on_the_header() -> None:
    # 8000x8000 claimed by a 70-byte file: decoding it would fail, so the pixel error proves the
    # limit is checked before any pixel is decoded.
    with pytest.raises(
        ImageError,
        match=r"^big\.png: too many pixels: 8000x8000 = 64000000 "
        r"\(max 36000000 pixels, ImageLimits.max_pixels\)$",
    ):
        load_image(png_claiming_size(8000, 8000), name="big.png")


def test_decompression_bomb_is_an_image_error() -> None:
    # Past twice Pillow's own limit, Image.open raises before our check can run.
    limits = ImageLimits(max_pixels=10**12)
    with pytest.raises(ImageError, match=r"^bomb\.png: too many pixels .*max 1000000000000 pixels"):
        load_image(png_claiming_size(100_000, 100_000), limits, name="bomb.png")


def test_pixel_limit_on_real_and_pil_images(rgb_image: Image.Image) -> None:
    limits = ImageLimits(max_pixels=5)
    with pytest.raises(ImageError, match=r"too many pixels: 3x2 = 6 \(max 5 pixels"):
        load_image(encode(rgb_image), limits)
    with pytest.raises(ImageError, match=r"^PIL image \(3x2 RGB\): too many pixels: 3x2 = 6"):
        load_image(rgb_image, limits)
    assert load_image(rgb_image, ImageLimits(max_pixels=6)).size == (3, 2)


def test_remote_urls_refused_by_default() -> None:
    with pytest.raises(
        ImageError,
        match=r"^remote image URLs are disabled; https://example\.com/cat\.png was not fetched",
    ):
        load_image("https://example.com/cat.png")


def test_remote_url_fetched_when_allowed(monkeypatch, rgb_image: Image.Image) -> None:
    calls = []

    class FakeResponse(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            calls.append(("read", size))
            return super().read(size)

    def fake_urlopen(url: str, timeout: float) -> FakeResponse:
        calls.append((url, timeout))
        return FakeResponse(encode(rgb_image))

    monkeypatch.setattr(images.urllib.request, "urlopen", fake_urlopen)
    limits = ImageLimits(allow_remote=True, max_bytes=1000)
    image = load_image("http://example.com/a.png", limits)
    assert pixels(image) == pixels(rgb_image)
    assert calls == [("http://example.com/a.png", 10.0), ("read", 1001)]


def test_local_files_refused_when_disabled(png_path: Path) -> None:
    limits = ImageLimits(allow_local_files=False)
    for source in (str(png_path), png_path, png_path.as_uri()):
        label = png_path.as_uri() if isinstance(source, str) and "://" in source else png_path
        with pytest.raises(
            ImageError, match=rf"^local image files are disabled; {label} was not read"
        ):
            load_image(source, limits)


def test_unsupported_scheme() -> None:
    with pytest.raises(ImageError, match=r"^ftp://host/a\.png: unsupported URL scheme 'ftp'"):
        load_image("ftp://host/a.png")


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match=r"^int: unsupported image source type int"):
        load_image(42)  # type: ignore[arg-type]


# --- digest, count, limits ---------------------------------------------------------------------


def test_digest_depends_on_pixels_only(png_path: Path, rgb_image: Image.Image) -> None:
    from_file = image_digest(load_image(png_path))
    assert from_file == image_digest(load_image(rgb_image))
    assert len(from_file) == 64
    changed = rgb_image.copy()
    changed.putpixel((0, 0), (254, 0, 0))
    assert image_digest(changed) != from_file
    # Same bytes, different shape.
    assert image_digest(make_image([RED, GREEN], (2, 1))) != image_digest(
        make_image([RED, GREEN], (1, 2))
    )


def test_check_image_count() -> None:
    check_image_count(16, ImageLimits())
    with pytest.raises(ImageError, match=r"^too many images: 17 \(max 16 per conversation"):
        check_image_count(17, ImageLimits())
    with pytest.raises(ImageError, match=r"^too many images: 3 \(max 2 per conversation"):
        check_image_count(3, ImageLimits(max_images=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "ImageLimits.max_bytes must be a positive int, got 0"),
        ({"max_pixels": -1}, "ImageLimits.max_pixels must be a positive int, got -1"),
        ({"max_images": 1.5}, "ImageLimits.max_images must be a positive int, got 1.5"),
        ({"max_images": True}, "ImageLimits.max_images must be a positive int, got True"),
        ({"allow_remote": "yes"}, "ImageLimits.allow_remote must be True or False, got 'yes'"),
    ],
)
def test_limits_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ImageLimits(**kwargs)
    assert str(info.value) == message
