"""What a model of the catalog is: its request limits, size rule, price rule and lifecycle, as types.

Prices are USD micros (1 USD = 1,000,000). The estimate is what a job is quoted at submit; the vendor's
own usage figure, where it reports one, replaces it at completion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

#: the request limits every model shares: those of the REST route this service replaces
MIN_SIDE = 256
MAX_SIDE = 2048
MAX_VARIANTS = 4
MAX_PROMPT_CHARS = 2000
OUTPUT_FORMATS = ("png", "jpeg", "webp")
VENDORS = ("bfl", "openai", "ark", "gemini")
#: lifecycle states: `deprecated` has a shutdown date ahead; `retired` is past it (or announced gone)
STATES = ("active", "deprecated", "retired")


class CatalogError(ValueError):
    """The catalog file cannot be used; the message names the entry and the field."""


@dataclass(frozen=True, kw_only=True)
class CostQuery:
    """What a price depends on."""

    width: int
    height: int
    num_variants: int
    reference_images: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class NativeSize:
    """What to ask a vendor for, and the size of the image it delivers for it."""

    width: int
    height: int
    #: for vendors that take a ratio rather than pixels (Gemini), e.g. "16:9"
    aspect_ratio: str | None = None
    #: Gemini's `imageSize` tier ("1K", "2K", "4K"), or None for a model with one size per ratio
    image_size: str | None = None


@dataclass(frozen=True, kw_only=True)
class SizeRule:
    """Which sizes a vendor model draws.

    `multiple`: any width x height in steps of `step` within the pixel, side and ratio limits; the request
    is asked for exactly when it fits (no crop), else the nearest size that covers it.
    `aspect_ratios`: a fixed size per aspect ratio (`ratios`, at the smallest tier), optionally in
    `tiers` scaled 2x, 4x; the closest ratio at the smallest tier that covers the request.
    """

    rule: str
    step: int = 1
    min_side: int = 1
    min_pixels: int = 0
    max_pixels: int = 0
    max_side: int = 0
    max_ratio: float = 0.0
    ratios: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    tiers: Mapping[str, int] = field(default_factory=dict)

    def native(self, width: int, height: int) -> NativeSize:
        """The size to ask for, to be centre-cropped and resized to exactly `width x height`."""
        if width <= 0 or height <= 0:
            raise ValueError(f"size must be positive, got {width}x{height}")
        if self.rule == "aspect_ratios":
            return self._by_ratio(width, height)
        return self._multiple(width, height)

    def _multiple(self, width: int, height: int) -> NativeSize:
        w, h = width, height
        if self.max_ratio:
            # A request longer than the model draws: a wider image is cropped to it.
            if w > h * self.max_ratio:
                h = math.ceil(w / self.max_ratio)
            elif h > w * self.max_ratio:
                w = math.ceil(h / self.max_ratio)
        if w * h < self.min_pixels:
            # Scaled up in integers, so that exact cases (1080x1920 -> 1440x2560) stay exact.
            w, h = max(w, _ceil_sqrt(w * self.min_pixels, h)), max(h, _ceil_sqrt(h * self.min_pixels, w))
        w, h = max(w, self.min_side), max(h, self.min_side)
        w, h = _round_up(w, self.step), _round_up(h, self.step)
        too_many = self.max_pixels and w * h > self.max_pixels
        too_long = self.max_side and max(w, h) > self.max_side
        if too_many or too_long:
            scale = min(
                math.sqrt(self.max_pixels / (w * h)) if self.max_pixels else 1.0,
                self.max_side / max(w, h) if self.max_side else 1.0,
            )
            w = max(self.step, int(w * scale) // self.step * self.step)
            h = max(self.step, int(h * scale) // self.step * self.step)
        return NativeSize(width=w, height=h)

    def _by_ratio(self, width: int, height: int) -> NativeSize:
        target = math.log(width / height)
        ratio = min(self.ratios, key=lambda name: abs(target - math.log(_ratio(name))))
        base_width, base_height = self.ratios[ratio]
        if not self.tiers:
            return NativeSize(width=base_width, height=base_height, aspect_ratio=ratio)
        tier, scale = next(iter(self.tiers.items()))
        for tier, scale in self.tiers.items():  # noqa: B007 - the tier the loop stops on is the answer
            if base_width * scale >= width and base_height * scale >= height:
                break
        # When no tier covers the request, the loop ends on the largest.
        return NativeSize(
            width=base_width * scale, height=base_height * scale, aspect_ratio=ratio, image_size=tier
        )


@dataclass(frozen=True, kw_only=True)
class PriceRule:
    """How a model is billed, as data.

    `per_image`: `usd` an image. `per_megapixel`: `first_megapixel_usd` for the first output megapixel,
    `further_megapixel_usd` for each further one, `reference_image_usd` per reference image (counted as
    one megapixel). `per_token`: USD per million tokens of each kind; the quote uses `output_tokens` per
    image, keyed by the `quality` option or by the size tier (`estimate_by`), plus
    `reference_image_tokens` per reference image.
    """

    rule: str
    usd: float = 0.0
    first_megapixel_usd: float = 0.0
    further_megapixel_usd: float = 0.0
    reference_image_usd: float = 0.0
    text_input: float = 0.0
    image_input: float = 0.0
    image_output: float = 0.0
    text_output: float = 0.0
    estimate_by: str = ""
    default_key: str = ""
    output_tokens: Mapping[str, int] = field(default_factory=dict)
    reference_image_tokens: int = 0
    summary: str = ""
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class Lifecycle:
    """Where a vendor model is in its life, and where that was read."""

    state: str = "active"
    shutdown_date: date | None = None
    #: the product id to use instead
    replacement: str | None = None
    #: the vendor model this lifecycle is about, when it is not the one serving the id (an alias's)
    vendor_model: str | None = None
    #: where the facts come from (a URL, or a description of third-party sources)
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One product id of the catalog: a (vendor, vendor model id) pair with its limits and price."""

    id: str
    display_name: str
    vendor: str
    vendor_model: str
    strengths: str = ""
    min_width: int = MIN_SIDE
    max_width: int = MAX_SIDE
    min_height: int = MIN_SIDE
    max_height: int = MAX_SIDE
    max_variants: int = MAX_VARIANTS
    supports_seed: bool = False
    supports_negative_prompt: bool = False
    max_reference_images: int = 0
    output_formats: tuple[str, ...] = OUTPUT_FORMATS
    #: provider_options keys this model accepts, with the values allowed (bool: true or false)
    option_values: Mapping[str, tuple[Any, ...] | type] = field(default_factory=dict)
    #: options accepted for older callers but not sent to the vendor
    ignored_options: frozenset[str] = frozenset()
    #: provider_options.tier values and the vendor model each asks for
    tiers: Mapping[str, str] = field(default_factory=dict)
    size: SizeRule = field(default_factory=lambda: SizeRule(rule="multiple"))
    price: PriceRule = field(default_factory=lambda: PriceRule(rule="per_image"))
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    #: the product id that serves this one, for an alias
    alias_of: str | None = None

    @property
    def price_summary(self) -> str:
        """The price in a line, for people."""
        return self.price.summary

    @property
    def price_per_image_usd_micros(self) -> int:
        """A `per_image` model's price (0 for the other rules)."""
        return _micros(self.price.usd) if self.price.rule == "per_image" else 0

    def vendor_model_for(self, options: Mapping[str, Any]) -> str:
        """The vendor model a request with `options` runs on (its `tier`, if the model has tiers)."""
        tier = options.get("tier")
        if isinstance(tier, str) and tier in self.tiers:
            return self.tiers[tier]
        return self.vendor_model

    def estimate_usd_micros(self, query: CostQuery) -> int:
        """The quoted cost of a request, before the vendor reports its own figure."""
        price = self.price
        if price.rule == "per_image":
            return _micros(price.usd) * query.num_variants
        native = self.size.native(query.width, query.height)
        if price.rule == "per_megapixel":
            # a reference is counted as one megapixel; BFL's `cost` at submit replaces the estimate
            megapixels = max(1, round(native.width * native.height / 1_000_000))
            per_image = (
                _micros(price.first_megapixel_usd)
                + _micros(price.further_megapixel_usd) * (megapixels - 1)
                + _micros(price.reference_image_usd) * query.reference_images
            )
            return per_image * query.num_variants
        if price.estimate_by == "tier":
            tokens = price.output_tokens.get(native.image_size or price.default_key, 0)
        else:
            quality = str(query.options.get("quality", price.default_key))
            per_1024 = price.output_tokens.get(quality, price.output_tokens.get(price.default_key, 0))
            tokens = math.ceil(per_1024 * native.width * native.height / (1024 * 1024))
        millionths = tokens * _micros(price.image_output) + (
            price.reference_image_tokens * query.reference_images * _micros(price.image_input)
        )
        return -(-millionths // 1_000_000) * query.num_variants


def usd_micros_to_cents(micros: int) -> int:
    """Whole cents, rounded up: a job that cost anything never shows as free."""
    return -(-micros // 10_000)


def bfl_native_size(width: int, height: int) -> tuple[int, int]:
    """FLUX.2 takes any size from 64 px to 4 MP in multiples of 16: round each side up to 16."""
    return (_round_up(width, 16), _round_up(height, 16))


def _micros(usd: float) -> int:
    return round(usd * 1_000_000)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _ceil_sqrt(numerator: int, denominator: int) -> int:
    """The smallest integer n with n² ≥ numerator / denominator."""
    root = math.isqrt(numerator // denominator)
    while root * root * denominator < numerator:
        root += 1
    return root


def _ratio(name: str) -> float:
    width, height = name.split(":")
    return int(width) / int(height)
