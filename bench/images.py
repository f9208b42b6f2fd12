"""images: time per image for download, decode, resize and encode at 1024², 1080x1920 and 2048².

The source of each size has the size the default model delivers for it (FLUX.2 [pro]'s native size, each
side rounded up to 16) and is a PNG, the default output format, which BFL then delivers. Its content is
photo-like: the sandbox's placeholder with film-grain noise, because the placeholder alone (a smooth
gradient) compresses 20x better than a photo and would make decoding and encoding look several times
cheaper than they are; the placeholder's own figures are in the details. Downloads come from a static
file server in its own process. Decode, resize and encode are the steps of `providers.imaging.fit_image`,
timed one by one (resize is a crop, or nothing, when the native size is the requested one, as here),
and `fit_image` is timed whole, PNG asked (when the native size is the requested one the image is kept as
delivered once it decodes: no resize, no encode) and JPEG asked (in the details: decode and re-encode);
each figure is the median of `reps`.

The same work runs in the worker through `asyncio.to_thread`; the last figure is the longest an event
loop timer (1 ms) was late while 2048² images were fitted that way, each a whole decode and encode (JPEG
asked of a PNG), beside the same work done inline.
"""

from __future__ import annotations

import asyncio
import functools
import io
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image, ImageFilter, ImageOps

from bench._harness import Figure, RunContext, ScenarioResult, children, ms, start_child
from providers.catalog import bfl_native_size
from providers.imaging import fit_image
from sandbox.drawing import draw_placeholder

NAME = "images"


@dataclass(frozen=True)
class Sizes:
    """Which output sizes and how many repetitions."""

    outputs: tuple[tuple[int, int], ...] = ((1024, 1024), (1080, 1920), (2048, 2048))
    reps: int = 3
    lag_images: int = 2


FULL = Sizes()
QUICK = Sizes(outputs=((512, 512),), reps=1, lag_images=1)


def photo_like(width: int, height: int) -> bytes:
    """A PNG as large and as hard to compress as a photo of this size: the placeholder with grain."""
    base = Image.open(
        io.BytesIO(
            draw_placeholder(
                prompt="a lighthouse at dusk, bench", seed=7, width=width, height=height, image_format="png"
            )
        )
    ).convert("RGB")
    grain = Image.merge("RGB", [Image.effect_noise(base.size, 12) for _ in range(3)])
    image = Image.blend(base, grain.filter(ImageFilter.GaussianBlur(0.8)), 0.35)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # as the sandbox encodes its PNGs
    return buffer.getvalue()


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = work()
    return time.perf_counter() - began, result


def _phases(data: bytes, width: int, height: int) -> dict[str, float]:
    """Wall seconds of each step of fit_image, done the way fit_image does it."""
    decode_s, image = _timed(lambda: _decode(data))
    resize_s, fitted = _timed(lambda: _crop_and_resize(image, width, height))
    encode_s, _ = _timed(lambda: fitted.save(io.BytesIO(), format="PNG", compress_level=1))  # as fit_image
    total_s, _ = _timed(lambda: fit_image(data, width=width, height=height, output_format="png"))
    jpeg_s, _ = _timed(lambda: fit_image(data, width=width, height=height, output_format="jpeg"))
    return {
        "decode": decode_s,
        "resize": resize_s,
        "encode": encode_s,
        "fit_image": total_s,
        "fit_image_jpeg": jpeg_s,
    }


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    source_width, source_height = image.size
    if source_width * height > width * source_height:
        crop_width, crop_height = round(source_height * width / height), source_height
    else:
        crop_width, crop_height = source_width, round(source_width * height / width)
    left, top = (source_width - crop_width) // 2, (source_height - crop_height) // 2
    box = (left, top, left + crop_width, top + crop_height)
    if (crop_width, crop_height) == (width, height):
        return image if image.size == (width, height) else image.crop(box)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


async def _loop_lag(work: Callable[[], Awaitable[None]]) -> float:
    """The longest a 1 ms timer of this event loop was late while `work` ran."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            began = loop.time()
            await asyncio.sleep(0.001)  # the probe itself: how late does a 1 ms timer fire?
            worst = max(worst, loop.time() - began - 0.001)

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)  # let the probe take a few baseline ticks
    await work()
    done.set()
    await probe
    return worst


async def run(ctx: RunContext) -> ScenarioResult:
    """Draw the sources, serve them, then time each step per size."""
    sizes = QUICK if ctx.quick else FULL
    directory = ctx.run_dir / "images"
    directory.mkdir(exist_ok=True)
    sources: dict[tuple[int, int], bytes] = {}
    placeholders: dict[tuple[int, int], float] = {}
    for width, height in sizes.outputs:
        native_width, native_height = bfl_native_size(width, height)
        data = await asyncio.to_thread(photo_like, native_width, native_height)
        (directory / f"{width}x{height}.png").write_bytes(data)
        sources[(width, height)] = data
        placeholder = draw_placeholder(
            prompt="a lighthouse at dusk, bench",
            seed=7,
            width=native_width,
            height=native_height,
            image_format="png",
        )
        fit_placeholder = functools.partial(
            fit_image, placeholder, width=width, height=height, output_format="png"
        )
        placeholders[(width, height)] = statistics.median(
            _timed(fit_placeholder)[0] for _ in range(sizes.reps)
        )
    figures: list[Figure] = []
    details: dict[str, Any] = {"reps": sizes.reps, "output_format": "png"}
    async with children() as started:
        files = await start_child("image-files", "bench._files", [str(directory)], run_dir=ctx.run_dir)
        started.append(files)
        async with aiohttp.ClientSession() as session:
            for (width, height), data in sources.items():
                url = f"{files.info['base_url']}/{width}x{height}.png"
                downloads = []
                for _ in range(sizes.reps):
                    began = time.perf_counter()
                    async with session.get(url) as response:
                        body = await response.read()
                    downloads.append(time.perf_counter() - began)
                    assert body == data
                steps = [_phases(data, width, height) for _ in range(sizes.reps)]
                median = {key: statistics.median(step[key] for step in steps) for key in steps[0]}
                median["download"] = statistics.median(downloads)
                size = f"{width}x{height}" if width != height else f"{width}²"
                for step in ("download", "decode", "resize", "encode", "fit_image"):
                    label = "fit_image (PNG asked)" if step == "fit_image" else step
                    figures.append(Figure(NAME, f"{size}: {label}", ms(median[step]), "ms"))
                details[size] = {
                    "source": f"{bfl_native_size(width, height)[0]}x{bfl_native_size(width, height)[1]} png, "
                    f"{len(data):,} bytes",
                    **{f"{key}_ms": ms(value) for key, value in median.items()},
                    "fit_image_of_the_plain_placeholder_ms": ms(placeholders[(width, height)]),
                }
    largest = sources[max(sources, key=lambda size: size[0] * size[1])]
    side = max(sources, key=lambda size: size[0] * size[1])

    async def threaded() -> None:
        for _ in range(sizes.lag_images):
            await asyncio.to_thread(fit_image, largest, width=side[0], height=side[1], output_format="jpeg")

    async def inline() -> None:
        for _ in range(sizes.lag_images):
            fit_image(largest, width=side[0], height=side[1], output_format="jpeg")

    off_loop, on_loop = await _loop_lag(threaded), await _loop_lag(inline)
    figures.append(
        Figure(
            NAME,
            f"event-loop stall while fitting {side[0]}x{side[1]} off the loop",
            ms(off_loop),
            "ms",
            baseline=ms(on_loop),
            baseline_label="the same work on the loop",
        )
    )
    return ScenarioResult(figures, details)
