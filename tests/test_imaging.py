"""fit_image: exact output sizes, formats, alpha handling and refusal of unreadable bytes."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from providers.base import InvalidProviderResponse
from providers.imaging import MAX_PIXELS, FittedImage, fit_image


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    red, green, blue = pixel[:3]
    return int(red), int(green), int(blue)


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    corners = Image.new("RGB", (2, 2))
    corners.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    return corners.resize((width, height), Image.Resampling.BILINEAR).convert(mode)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((1088, 1920), (1080, 1920)),  # FLUX's native size for a story: crop 4 px each side
        ((1024, 1024), (1080, 1920)),  # a square cropped to 9:16, then upscaled
        ((256, 256), (512, 512)),  # plain upscale
        ((1536, 1024), (1280, 720)),  # 3:2 to 16:9, downscale
        ((1000, 1000), (1000, 1000)),  # already exact
    ],
)
def test_output_has_exactly_the_requested_size(source: tuple[int, int], target: tuple[int, int]) -> None:
    data = encode(gradient(*source), "JPEG")

    fitted = fit_image(data, width=target[0], height=target[1], output_format="png")

    assert (fitted.width, fitted.height) == target
    assert decode(fitted.data).size == target
    assert (fitted.native_width, fitted.native_height) == source


def test_crop_is_centred() -> None:
    # Left and right quarters black, middle half white: a centred 1:1 crop of 2:1 is all white.
    source = Image.new("L", (400, 200), 0)
    source.paste(255, (100, 0, 300, 200))

    fitted = fit_image(encode(source, "PNG"), width=200, height=200, output_format="png")

    assert decode(fitted.data).getextrema() == (255, 255)


def test_exact_size_png_is_not_resampled() -> None:
    source = gradient(64, 48)

    fitted = fit_image(encode(source, "PNG"), width=64, height=48, output_format="png")

    assert decode(fitted.data).tobytes() == source.tobytes()


@pytest.mark.parametrize(
    ("output_format", "pillow_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_an_image_delivered_as_asked_is_kept_byte_for_byte(output_format: str, pillow_format: str) -> None:
    # no re-encode: no generation loss for JPEG and WebP, and a quarter of the CPU
    data = encode(gradient(64, 48), pillow_format)

    fitted = fit_image(data, width=64, height=48, output_format=output_format)

    assert fitted.data == data and fitted.sha256 == hashlib.sha256(data).hexdigest()
    assert (fitted.width, fitted.height, fitted.native_width, fitted.native_height) == (64, 48, 64, 48)


@pytest.mark.parametrize(
    ("source", "image_format", "output_format"),
    [
        pytest.param(gradient(64, 48), "PNG", "jpeg", id="another-format"),
        pytest.param(gradient(64, 48).convert("P"), "PNG", "png", id="palette"),
        pytest.param(gradient(64, 48).convert("CMYK"), "JPEG", "jpeg", id="cmyk"),
        pytest.param(gradient(64, 64), "PNG", "png", id="another-size"),
    ],
)
def test_an_image_not_quite_as_asked_is_re_encoded(
    source: Image.Image, image_format: str, output_format: str
) -> None:
    data = encode(source, image_format)

    fitted = fit_image(data, width=64, height=48, output_format=output_format)

    assert fitted.data != data
    image = decode(fitted.data)
    assert image.size == (64, 48) and image.mode in ("L", "RGB", "RGBA")


def test_an_image_delivered_as_asked_must_still_decode() -> None:
    data = bytearray(encode(gradient(64, 48), "PNG"))
    data[len(data) // 2] ^= 0xFF  # inside the pixel data: the header still reads as a 64x48 PNG

    with pytest.raises(InvalidProviderResponse, match="truncated or corrupt"):
        fit_image(bytes(data), width=64, height=48, output_format="png")


@pytest.mark.parametrize(
    ("output_format", "content_type", "pillow_format"),
    [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")],
)
def test_formats_and_content_types(output_format: str, content_type: str, pillow_format: str) -> None:
    fitted = fit_image(encode(gradient(96, 64), "PNG"), width=48, height=32, output_format=output_format)

    assert fitted.content_type == content_type
    assert decode(fitted.data).format == pillow_format


def test_sha256_and_size_describe_the_bytes() -> None:
    fitted = fit_image(encode(gradient(80, 80), "JPEG"), width=64, height=64, output_format="jpeg")

    assert fitted.sha256 == hashlib.sha256(fitted.data).hexdigest()
    assert fitted.size_bytes == len(fitted.data)
    assert isinstance(fitted, FittedImage)


def test_transparent_png_becomes_jpeg_on_white() -> None:
    source = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    source.paste((255, 0, 0, 255), (0, 0, 32, 64))  # opaque red left half

    fitted = fit_image(encode(source, "PNG"), width=64, height=64, output_format="jpeg")

    image = decode(fitted.data)
    assert image.mode == "RGB"
    assert min(rgb(image, 56, 32)) > 240  # white, not the hidden black
    red, green, blue = rgb(image, 8, 32)
    assert red > 200 and green < 60 and blue < 60


def test_png_keeps_alpha() -> None:
    source = Image.new("RGBA", (32, 32), (10, 20, 30, 128))

    fitted = fit_image(encode(source, "PNG"), width=16, height=16, output_format="png")

    assert decode(fitted.data).mode == "RGBA"


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1"])
def test_other_modes_convert_to_jpeg(mode: str) -> None:
    source = gradient(40, 40, "RGB").convert(mode)
    image_format = "JPEG" if mode == "CMYK" else "PNG"

    fitted = fit_image(encode(source, image_format), width=20, height=20, output_format="jpeg")

    assert decode(fitted.data).mode in ("RGB", "L")


def test_palette_with_transparency_converts_to_jpeg() -> None:
    source = Image.new("P", (32, 32), 0)
    source.putpalette([0, 0, 0, 255, 0, 0])
    source.paste(1, (0, 0, 16, 32))
    data = encode(source, "PNG", transparency=0)

    fitted = fit_image(data, width=32, height=32, output_format="jpeg")

    assert min(rgb(decode(fitted.data), 28, 16)) > 240


def test_exif_orientation_is_applied() -> None:
    source = gradient(100, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encode(source, "JPEG", exif=exif.tobytes())

    fitted = fit_image(data, width=50, height=100, output_format="jpeg")

    assert (fitted.native_width, fitted.native_height) == (50, 100)
    # the upright image is exactly as asked, but the bytes are not: they are re-encoded, without the tag
    image = decode(fitted.data)
    assert image.size == (50, 100) and image.getexif().get(0x0112) is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not an image at all", id="garbage"),
        pytest.param(b'{"error": "oops"}', id="json"),
        pytest.param(encode(gradient(64, 64), "JPEG")[:300], id="truncated-jpeg"),
        pytest.param(encode(gradient(64, 64), "PNG")[:200], id="truncated-png"),
        pytest.param(encode(gradient(16, 16), "GIF"), id="gif-not-a-vendor-format"),
    ],
)
def test_unreadable_bytes_are_an_invalid_provider_response(data: bytes) -> None:
    with pytest.raises(InvalidProviderResponse) as caught:
        fit_image(data, width=32, height=32, output_format="png")

    assert caught.value.message
    assert not caught.value.retryable


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((8000, 7000), id="over-our-limit"),
        pytest.param((10000, 10000), id="over-pillows-warning-limit"),
    ],
)
def test_decompression_bombs_are_refused(size: tuple[int, int]) -> None:
    assert size[0] * size[1] > MAX_PIXELS
    data = encode(Image.new("1", size), "PNG")  # a few kB that decode to tens of megapixels

    with pytest.raises(InvalidProviderResponse, match=r"too large|limit"):
        fit_image(data, width=64, height=64, output_format="png")


def test_unknown_output_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="gif"):
        fit_image(encode(gradient(8, 8), "PNG"), width=8, height=8, output_format="gif")
