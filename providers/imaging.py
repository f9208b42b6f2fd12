"""Turn an image as a vendor delivered it into exactly the size and format the caller asked for.

The caller's `width x height` is the contract; vendors deliver their closest native size. `fit_image`
centre-crops to the requested aspect ratio, resizes to the exact size and re-encodes. When the vendor
delivered exactly what was asked (size, format, an upright single frame in a plain mode), its bytes are
kept as they are once they decode: a re-encode would cost three times the decode and, for JPEG and
WebP, lose quality for nothing. It is synchronous CPU work: the worker runs it in a thread
(`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from providers.base import InvalidProviderResponse

__all__ = ["CONTENT_TYPES", "MAX_PIXELS", "FittedImage", "fit_image"]

#: the largest decoded image accepted; vendors deliver at most ~17 MP, so anything bigger is hostile
MAX_PIXELS = 50_000_000

#: the content type of each output format
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# The only formats vendors deliver; refusing the rest keeps Pillow's rarer decoders out of reach.
_ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")

_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    # zlib level 1: several times faster than Pillow's default 6 for a slightly larger file; encoding
    # is most of a job's CPU.
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 92},
    "webp": {"format": "WEBP", "quality": 90},
}


@dataclass(frozen=True, kw_only=True)
class FittedImage:
    """An image encoded at exactly the requested size, with the size the vendor delivered."""

    data: bytes
    content_type: str
    width: int
    height: int
    native_width: int
    native_height: int
    #: hex SHA-256 of `data`
    sha256: str

    @property
    def size_bytes(self) -> int:
        """Length of the encoded image."""
        return len(self.data)


def fit_image(data: bytes, *, width: int, height: int, output_format: str) -> FittedImage:
    """Decode `data`, centre-crop it to the aspect ratio of `width x height`, resize and re-encode it."""
    if output_format not in _SAVE_OPTIONS:
        raise ValueError(
            f"unsupported output format {output_format!r}; expected one of {list(CONTENT_TYPES)}"
        )
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    image, upright = _decode(data)
    native_width, native_height = image.size
    if upright and _as_asked(image, width, height, output_format):
        encoded = data
    else:
        fitted = _crop_and_resize(_normalise_mode(image), width, height)
        if output_format == "jpeg":
            fitted = _flatten_alpha(fitted)
        buffer = io.BytesIO()
        fitted.save(buffer, **_SAVE_OPTIONS[output_format])
        encoded = buffer.getvalue()
    return FittedImage(
        data=encoded,
        content_type=CONTENT_TYPES[output_format],
        width=width,
        height=height,
        native_width=native_width,
        native_height=native_height,
        sha256=hashlib.sha256(encoded).hexdigest(),
    )


def _decode(data: bytes) -> tuple[Image.Image, bool]:
    """The image, decoded in full (so that a corrupt one is refused here) and upright; and whether it
    already was (no EXIF orientation to apply)."""
    if not data:
        raise InvalidProviderResponse("the provider's image is empty (0 bytes)")
    try:
        # Pillow's own bomb guard warns from ~89 MP and raises from ~179 MP; when warnings are errors
        # (as in the tests) the warning arrives as an exception, so both are caught below.
        image = Image.open(io.BytesIO(data), formats=_ACCEPTED_FORMATS)
        pixels = image.width * image.height
        if pixels > MAX_PIXELS:
            raise InvalidProviderResponse(
                f"the provider's image is {image.width}x{image.height} ({pixels / 1e6:.0f} MP), "
                f"over the {MAX_PIXELS / 1e6:.0f} MP limit"
            )
        image.load()
        # A vendor JPEG may carry an EXIF orientation; re-encoding drops EXIF, so apply it first.
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
            return image, True
        transposed = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidProviderResponse(f"the provider's image is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidProviderResponse(
            f"the provider's {len(data)}-byte body is not a PNG, JPEG or WebP image"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"),
        # SyntaxError ("broken PNG file") or EOFError, depending on the codec.
        raise InvalidProviderResponse(f"the provider's image is truncated or corrupt: {exc}") from exc
    return transposed, False


#: the modes an image of each format is kept in as delivered; others are converted by a re-encode
_KEPT_MODES = {"PNG": ("L", "LA", "RGB", "RGBA"), "JPEG": ("L", "RGB"), "WEBP": ("RGB", "RGBA")}


def _as_asked(image: Image.Image, width: int, height: int, output_format: str) -> bool:
    """Whether an upright decoded image is already exactly what `fit_image` would make of it."""
    image_format = _SAVE_OPTIONS[output_format]["format"]
    return (
        image.size == (width, height)
        and image.format == image_format
        and image.mode in _KEPT_MODES[image_format]
        and getattr(image, "n_frames", 1) == 1  # an animation would keep only its first frame
    )


def _normalise_mode(image: Image.Image) -> Image.Image:
    # Resampling needs L, LA, RGB or RGBA: palette and bilevel images would be resized with NEAREST,
    # and CMYK, YCbCr or 16-bit modes cannot be saved to every output format.
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("PA", "RGBa", "La"):
        return image.convert("RGBA")
    return image.convert("RGB")


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    source_width, source_height = image.size
    # Compare ratios by cross-multiplying so that exact matches stay exact (no float rounding).
    if source_width * height > width * source_height:
        crop_width, crop_height = round(source_height * width / height), source_height
    else:
        crop_width, crop_height = source_width, round(source_width * height / width)
    left = (source_width - crop_width) // 2
    top = (source_height - crop_height) // 2
    box = (left, top, left + crop_width, top + crop_height)
    if (crop_width, crop_height) == (width, height):
        return image if image.size == (width, height) else image.crop(box)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # JPEG has no alpha: composite onto white rather than dropping the channel, whose hidden colour
    # under transparent pixels is often black.
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode == "LA":
        background = Image.new("L", image.size, 255)
        background.paste(image.getchannel("L"), mask=image.getchannel("A"))
        return background
    return image
