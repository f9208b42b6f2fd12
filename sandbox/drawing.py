"""Deterministic placeholder images: the prompt's words on a colour gradient seeded by prompt and seed."""

from __future__ import annotations

import functools
import hashlib
import io

from PIL import Image, ImageDraw, ImageFont

__all__ = ["CONTENT_TYPES", "draw_placeholder"]

#: content type of each format the sandbox can draw
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

_MARGIN_FRACTION = 0.05

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=16)
def draw_placeholder(
    *, prompt: str, seed: int, width: int, height: int, variant: int = 0, image_format: str = "jpeg"
) -> bytes:
    """Encode a `width x height` image that depends only on the arguments (same inputs, same bytes).

    The last few drawings are kept: a vendor's GPU time is not ours, so a sandbox asked for the same image
    again (a retried download, a benchmark's repeated request) does not spend this machine's CPU on it.
    """
    if image_format not in CONTENT_TYPES:
        raise ValueError(f"cannot draw {image_format!r}; expected one of {list(CONTENT_TYPES)}")
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{variant}".encode()).digest()
    image = _gradient(digest, width, height)
    _draw_words(image, prompt, caption=f"seed {seed} · {width}x{height} · variant {variant}")
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    elif image_format == "png":
        # Level 1: a placeholder does not need small files, and level 6 triples the time at 2048².
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="WEBP", quality=80)
    return buffer.getvalue()


def _gradient(digest: bytes, width: int, height: int) -> Image.Image:
    # Four corner colours stretched bilinearly: one resize of a 2x2 image, fast at any size.
    corners = Image.new("RGB", (2, 2))
    corners.putdata([(digest[i], digest[i + 1], digest[i + 2]) for i in range(0, 12, 3)])
    return corners.resize((width, height), Image.Resampling.BILINEAR)


def _draw_words(image: Image.Image, prompt: str, *, caption: str) -> None:
    width, height = image.size
    margin = max(2, round(min(width, height) * _MARGIN_FRACTION))
    size = max(8, min(width, height) // 14)
    caption_size = max(8, size // 2)
    font = ImageFont.load_default(size=size)
    caption_font = ImageFont.load_default(size=caption_size)
    draw = ImageDraw.Draw(image)
    line_height = round(size * 1.25)
    max_lines = max(1, (height - 2 * margin - line_height) // line_height)
    lines = _wrap(draw, prompt.split(), font, width - 2 * margin, max_lines)
    stroke = max(1, size // 16)
    for number, line in enumerate(lines):
        draw.text(
            (margin, margin + number * line_height),
            line,
            font=font,
            fill=(255, 255, 255),
            stroke_width=stroke,
            stroke_fill=(0, 0, 0),
        )
    draw.text(
        (margin, height - margin - caption_size),
        caption,
        font=caption_font,
        fill=(255, 255, 255),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )


def _wrap(
    draw: ImageDraw.ImageDraw, words: list[str], font: _Font, max_width: int, max_lines: int
) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            if len(lines) == max_lines:
                return lines
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines
