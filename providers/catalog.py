"""The model catalog: what each model can do and what it costs, as data.

Prices are USD micros (1 USD = 1,000,000), from shared/provider-apis.md as of `PRICE_TABLE_VERSION`.
The estimate is what a job is quoted at submit; the vendor's own usage figure, where it reports one,
replaces it at completion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PRICE_TABLE_VERSION = "2026-11-01"

#: the request limits every model shares: those of the REST route this service replaces
MIN_SIDE = 256
MAX_SIDE = 2048
MAX_VARIANTS = 4
MAX_PROMPT_CHARS = 2000
OUTPUT_FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True, kw_only=True)
class CostQuery:
    """What a price depends on."""

    width: int
    height: int
    num_variants: int
    reference_images: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model of the catalog: a (vendor, vendor model id) pair with its limits and price."""

    id: str
    display_name: str
    vendor: str
    vendor_model: str
    strengths: str
    min_width: int = MIN_SIDE
    max_width: int = MAX_SIDE
    min_height: int = MIN_SIDE
    max_height: int = MAX_SIDE
    max_variants: int = MAX_VARIANTS
    supports_seed: bool = False
    supports_negative_prompt: bool = False
    max_reference_images: int = 0
    output_formats: tuple[str, ...] = OUTPUT_FORMATS
    #: provider_options keys this model accepts, with the values allowed (None: any value of that type)
    option_values: Mapping[str, tuple[Any, ...] | type] = field(default_factory=dict)
    price_per_image_usd_micros: int = 0
    price_summary: str = ""
    estimator: Callable[[CostQuery], int] | None = None

    def estimate_usd_micros(self, query: CostQuery) -> int:
        """The quoted cost of a request, before the vendor reports its own figure."""
        if self.estimator is not None:
            return self.estimator(query)
        return self.price_per_image_usd_micros * query.num_variants


def usd_micros_to_cents(micros: int) -> int:
    """Whole cents, rounded up: a job that cost anything never shows as free."""
    return -(-micros // 10_000)


def bfl_native_size(width: int, height: int) -> tuple[int, int]:
    """FLUX.2 takes any size from 64 px to 4 MP in multiples of 16: round each side up to 16."""
    return (_round_up(width, 16), _round_up(height, 16))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _flux_2_pro_cost(query: CostQuery) -> int:
    # 3 credits for the first output megapixel, 1.5 for each further one, 1.5 per reference megapixel
    # (a reference is counted as one megapixel here; BFL's `cost` at submit replaces the estimate).
    width, height = bfl_native_size(query.width, query.height)
    megapixels = max(1, round(width * height / 1_000_000))
    credits_x10 = 30 + 15 * (megapixels - 1) + 15 * query.reference_images
    return credits_x10 * 1_000 * query.num_variants  # 1 credit = $0.01 = 10,000 micros


_GPT_IMAGE_1_5_PRICES = {  # (square, rectangular) per image
    "low": (9_000, 13_000),
    "medium": (34_000, 50_000),
    "high": (133_000, 200_000),
}


def _gpt_image_1_5_cost(query: CostQuery) -> int:
    # "auto" lets the model choose; it is quoted as "high" so that a quote never undershoots.
    quality = str(query.options.get("quality", "auto"))
    square, rectangular = _GPT_IMAGE_1_5_PRICES.get(quality, _GPT_IMAGE_1_5_PRICES["high"])
    # the same boundary the adapter uses to choose 1024x1024 over a rectangle (aspect within √1.5)
    w, h = query.width, query.height
    per_image = square if 2 * w * w <= 3 * h * h and 2 * h * h <= 3 * w * w else rectangular
    return per_image * query.num_variants


def _nano_banana_pro_cost(query: CostQuery) -> int:
    # 1120 output image tokens at $120 per million at 1K and 2K (this service's sizes, at most 2048 px,
    # never need 4K), plus 560 input tokens per reference image at $2 per million.
    return (134_400 + 1_120 * query.reference_images) * query.num_variants


CATALOG: Mapping[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="flux_2_pro",
            display_name="FLUX.2 [pro]",
            vendor="bfl",
            vendor_model="flux-2-pro",
            strengths="Photorealism, product photography, lifestyle scenes; text on image is often garbled.",
            supports_seed=True,
            max_reference_images=8,
            output_formats=("png", "jpeg", "webp"),
            option_values={"safety_tolerance": (0, 1, 2, 3, 4, 5), "prompt_upsampling": bool},
            price_summary="$0.03 first megapixel + $0.015 per further megapixel, per variant",
            estimator=_flux_2_pro_cost,
        ),
        ModelSpec(
            id="gpt_image_1_5",
            display_name="GPT Image 1.5",
            vendor="openai",
            vendor_model="gpt-image-1.5",
            strengths="Legible text on image: posters, sale banners, designs with copy.",
            max_reference_images=16,
            option_values={
                "quality": ("low", "medium", "high", "auto"),
                "background": ("transparent", "opaque", "auto"),
                "moderation": ("auto", "low"),
                "input_fidelity": ("low", "high"),
            },
            price_summary="per image: 1024² $0.009/$0.034/$0.133, rectangular $0.013/$0.050/$0.200 "
            "(low/medium/high)",
            estimator=_gpt_image_1_5_cost,
        ),
        ModelSpec(
            id="seedream_4",
            display_name="Seedream 4.0",
            vendor="ark",
            vendor_model="seedream-4-0-250828",
            strengths="Photoreal to stylised looks.",
            max_reference_images=14,
            option_values={"watermark": bool, "optimize_prompt": ("standard", "fast")},
            price_per_image_usd_micros=30_000,
            price_summary="$0.03 per image",
        ),
        ModelSpec(
            id="seedream_4_5",
            display_name="Seedream 4.5",
            vendor="ark",
            vendor_model="seedream-4-5-251128",
            strengths="Photoreal to stylised and artistic looks, finer detail than 4.0.",
            max_reference_images=14,
            option_values={"watermark": bool, "optimize_prompt": ("standard",)},
            price_per_image_usd_micros=40_000,
            price_summary="$0.04 per image",
        ),
        ModelSpec(
            id="nano_banana",
            display_name="Nano Banana (Gemini 2.5 Flash Image)",
            vendor="gemini",
            vendor_model="gemini-2.5-flash-image",
            strengths="Google's fast image model; good at edits from reference images.",
            max_reference_images=3,
            price_per_image_usd_micros=39_000,
            price_summary="$0.039 per image",
        ),
        ModelSpec(
            id="nano_banana_pro",
            display_name="Nano Banana Pro (Gemini 3 Pro Image)",
            vendor="gemini",
            vendor_model="gemini-3-pro-image-preview",
            strengths="Google's highest-fidelity image model: complex scenes, up to 14 references.",
            max_reference_images=14,
            price_summary="$0.1344 per image at 1K/2K, plus about $0.0011 per reference image",
            estimator=_nano_banana_pro_cost,
        ),
    )
}

DEFAULT_MODEL = "flux_2_pro"
