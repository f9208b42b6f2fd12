"""The model catalog: what each model can do, what it costs and how long its vendor keeps it, as data.

The data is `catalog.toml` beside this module (or the operator's copy named by IMAGEGEN_CATALOG_FILE),
checked whole at load: a bad entry raises `CatalogError` naming the entry and the field. Prices are USD
micros (1 USD = 1,000,000). The estimate is what a job is quoted at submit; the vendor's own usage
figure, where it reports one, replaces it at completion.

A product id is either a model (a vendor model with its limits, options, size rule and price rule) or an
alias of one (`alias_of`): an id callers still send after its vendor model was retired, served by
another model of the catalog, with a notice on each job.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

#: the catalog shipped with the service
SHIPPED_CATALOG_FILE = Path(__file__).with_name("catalog.toml")

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


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """What a submit for a product id gets: the model that serves it, and what to tell the caller."""

    entry: ModelSpec
    #: the model whose limits, options and price apply (the entry itself unless it is an alias)
    model: ModelSpec
    #: a line for the job's first event (alias, deprecation), or ""
    notice: str = ""
    #: why the id is refused (its vendor model is gone and nothing serves it), or None
    refusal: str | None = None


class Catalog(Mapping[str, ModelSpec]):
    """The product ids, in file order; lifecycle dates may be corrected by the vendor's own word."""

    def __init__(
        self, models: Mapping[str, ModelSpec], *, version: str, default: str, source: str = ""
    ) -> None:
        self._models = dict(models)
        self.version = version
        self.default = default
        #: the file it was read from
        self.source = source

    def __getitem__(self, key: str) -> ModelSpec:
        return self._models[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def serving(self, product_id: str) -> ModelSpec:
        """The model that serves `product_id` (the entry itself, or the one it is an alias of)."""
        entry = self._models[product_id]
        return self._models[entry.alias_of] if entry.alias_of else entry

    def resolve(self, product_id: str, today: date) -> Resolution:
        """How a submit for `product_id` is served on `today`, or why it is refused."""
        entry = self._models[product_id]
        if entry.alias_of:
            served = self.resolve(entry.alias_of, today)
            life = entry.lifecycle
            when = f" on {life.shutdown_date.isoformat()}" if life.shutdown_date else ""
            gone = "retired" if _past(life, today) else "retires"
            vendor = _VENDOR_NAMES.get(served.model.vendor, served.model.vendor)
            notice = (
                f"{entry.id} is served by {served.model.id} ({served.model.vendor_model}): "
                f"{vendor} {gone} {life.vendor_model or 'its former model'}{when}"
            )
            if served.refusal is not None:
                return Resolution(entry=entry, model=served.model, refusal=f"{notice}; and {served.refusal}")
            return Resolution(
                entry=entry, model=served.model, notice="; ".join(filter(None, (notice, served.notice)))
            )
        life = entry.lifecycle
        vendor = _VENDOR_NAMES.get(entry.vendor, entry.vendor)
        when = f" on {life.shutdown_date.isoformat()}" if life.shutdown_date else ""
        if _past(life, today):
            instead = f"; use {life.replacement} instead" if life.replacement else ""
            return Resolution(
                entry=entry,
                model=entry,
                refusal=f"{entry.id} is retired: {vendor} shut down {entry.vendor_model}{when}{instead}",
            )
        if life.shutdown_date is not None or life.state == "deprecated":
            instead = f"; move to {life.replacement}" if life.replacement else ""
            notice = f"{entry.id} is deprecated: {vendor} shuts down {entry.vendor_model}{when}{instead}"
            return Resolution(entry=entry, model=entry, notice=notice)
        return Resolution(entry=entry, model=entry)

    def state(self, product_id: str, today: date) -> str:
        """An id's lifecycle state on `today`: "retired" once its shutdown date has passed."""
        life = self._models[product_id].lifecycle
        return "retired" if _past(life, today) else life.state

    def vendor_models(self, vendor: str) -> dict[str, list[str]]:
        """{vendor model id: product ids it serves directly} for one vendor (a tiered id's default tier)."""
        found: dict[str, list[str]] = {}
        for spec in self._models.values():
            if not spec.alias_of and spec.vendor == vendor:
                found.setdefault(spec.vendor_model, []).append(spec.id)
        return found

    def set_shutdown_date(self, product_id: str, shutdown: date | None, source: str) -> None:
        """Take the vendor's shutdown date for a model over the file's."""
        spec = self._models[product_id]
        state = spec.lifecycle.state
        if shutdown is not None and state == "active":
            state = "deprecated"
        elif shutdown is None and state == "deprecated":
            state = "active"
        self._models[product_id] = replace(
            spec, lifecycle=replace(spec.lifecycle, shutdown_date=shutdown, state=state, source=source)
        )

    def shutdown_dates(self) -> dict[str, date]:
        """{product id: the shutdown date of the vendor model that serves it}, for ids that have one."""
        dates: dict[str, date] = {}
        for product_id, spec in self._models.items():
            serving = self.serving(product_id) if spec.alias_of else spec
            if serving.lifecycle.shutdown_date is not None:
                dates[product_id] = serving.lifecycle.shutdown_date
        return dates


_VENDOR_NAMES = {"bfl": "BFL", "openai": "OpenAI", "ark": "BytePlus", "gemini": "Google"}


def _past(life: Lifecycle, today: date) -> bool:
    if life.state == "retired":
        return True
    return life.shutdown_date is not None and life.shutdown_date <= today


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


# ---------------------------------------------------------------- loading and checking


def load_catalog(path: Path | str = SHIPPED_CATALOG_FILE) -> Catalog:
    """Read and check a catalog file; raises CatalogError naming the first bad entry and field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"catalog file {path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog file {path}: not valid TOML ({exc})") from None
    try:
        return _parse(data, str(path))
    except CatalogError as exc:
        raise CatalogError(f"catalog file {path}: {exc}") from None


_TOP_KEYS = frozenset({"version", "default", "sources", "model"})
_MODEL_KEYS = frozenset(
    {
        "id",
        "display_name",
        "vendor",
        "vendor_model",
        "strengths",
        "min_width",
        "max_width",
        "min_height",
        "max_height",
        "max_variants",
        "supports_seed",
        "supports_negative_prompt",
        "max_reference_images",
        "output_formats",
        "options",
        "ignored_options",
        "tiers",
        "size",
        "price",
        "lifecycle",
        "alias_of",
    }
)
_ALIAS_KEYS = frozenset({"id", "alias_of", "display_name", "lifecycle"})
_SIZE_KEYS = {
    "multiple": frozenset({"rule", "step", "min_side", "min_pixels", "max_pixels", "max_side", "max_ratio"}),
    "aspect_ratios": frozenset({"rule", "ratios", "tiers"}),
}
_PRICE_KEYS = {
    "per_image": frozenset({"rule", "usd", "summary", "source"}),
    "per_megapixel": frozenset(
        {
            "rule",
            "first_megapixel_usd",
            "further_megapixel_usd",
            "reference_image_usd",
            "summary",
            "source",
        }
    ),
    "per_token": frozenset(
        {
            "rule",
            "text_input",
            "image_input",
            "image_output",
            "text_output",
            "estimate_by",
            "default_key",
            "output_tokens",
            "reference_image_tokens",
            "summary",
            "source",
        }
    ),
}
_LIFECYCLE_KEYS = frozenset({"state", "shutdown_date", "replacement", "vendor_model", "source"})


class _Entry:
    """Reads one table of the file, naming it in every error."""

    def __init__(self, where: str, table: object) -> None:
        if not isinstance(table, dict):
            raise CatalogError(f"{where}: must be a table")
        self.where = where
        self.table: dict[str, Any] = table

    def fail(self, name: str, problem: str) -> CatalogError:
        return CatalogError(f"{self.where}: field {name!r} {problem}")

    def only(self, allowed: frozenset[str]) -> None:
        for name in self.table:
            if name not in allowed:
                raise self.fail(name, f"is not a known field (known: {', '.join(sorted(allowed))})")

    def text(self, name: str, *, required: bool = False, default: str = "") -> str:
        value = self.table.get(name)
        if value is None:
            if required:
                raise self.fail(name, "is required")
            return default
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.fail(name, "must be a non-empty string")
        return value

    def integer(self, name: str, default: int, *, low: int = 0) -> int:
        value = self.table.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(name, f"must be an integer >= {low}")
        return value

    def number(self, name: str, default: float = 0.0) -> float:
        value = self.table.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise self.fail(name, "must be a number >= 0")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "must be true or false")
        return value

    def sub(self, name: str) -> _Entry:
        return _Entry(f"{self.where}.{name}", self.table.get(name, {}))


def _parse(data: dict[str, Any], source: str) -> Catalog:
    top = _Entry("the file", data)
    top.only(_TOP_KEYS)
    version = top.text("version", required=True)
    sources = top.table.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise top.fail("sources", "must be a table of strings")
    raw_models = data.get("model")
    if not isinstance(raw_models, list) or not raw_models:
        raise top.fail("model", "must hold at least one [[model]] entry")
    models: dict[str, ModelSpec] = {}
    for index, raw in enumerate(raw_models):
        product_id = raw.get("id") if isinstance(raw, dict) else None
        where = f"entry {product_id!r}" if isinstance(product_id, str) else f"entry #{index + 1}"
        entry = _Entry(where, raw)
        spec = _alias(entry, sources) if "alias_of" in entry.table else _model(entry, sources)
        if spec.id in models:
            raise entry.fail("id", "repeats an earlier entry's id")
        models[spec.id] = spec
    for spec in models.values():
        checked = _Entry(f"entry {spec.id!r}", {})
        if spec.alias_of is not None:
            target = models.get(spec.alias_of)
            if target is None or target.alias_of is not None:
                raise checked.fail(
                    "alias_of", f"must name a model entry (not an alias), not {spec.alias_of!r}"
                )
        replacement = spec.lifecycle.replacement
        if replacement is not None and replacement not in models:
            raise checked.fail("lifecycle.replacement", f"names no entry of the catalog: {replacement!r}")
    default = top.text("default", required=True)
    if default not in models or models[default].alias_of is not None:
        raise top.fail("default", f"must name a model entry, not {default!r}")
    return Catalog(models, version=version, default=default, source=source)


def _alias(entry: _Entry, sources: Mapping[str, str]) -> ModelSpec:
    entry.only(_ALIAS_KEYS)
    product_id = _product_id(entry)
    lifecycle = _lifecycle(entry, sources)
    # Filled from the target by `Catalog.serving`; these fields only describe the id itself.
    return ModelSpec(
        id=product_id,
        display_name=entry.text("display_name", default=product_id),
        vendor="",
        vendor_model=lifecycle.vendor_model or "",
        alias_of=entry.text("alias_of", required=True),
        lifecycle=lifecycle,
    )


def _model(entry: _Entry, sources: Mapping[str, str]) -> ModelSpec:
    entry.only(_MODEL_KEYS)
    product_id = _product_id(entry)
    vendor = entry.text("vendor", required=True)
    if vendor not in VENDORS:
        raise entry.fail("vendor", f"must be one of {', '.join(VENDORS)}, not {vendor!r}")
    formats = entry.table.get("output_formats", list(OUTPUT_FORMATS))
    if not isinstance(formats, list) or not formats or any(f not in OUTPUT_FORMATS for f in formats):
        raise entry.fail("output_formats", f"must be a non-empty list of {', '.join(OUTPUT_FORMATS)}")
    options = _options(entry)
    tiers = entry.table.get("tiers", {})
    if not isinstance(tiers, dict) or not all(isinstance(v, str) and v for v in tiers.values()):
        raise entry.fail("tiers", "must be a table of tier name = vendor model id")
    if tiers:
        options["tier"] = tuple(tiers)
    ignored = entry.table.get("ignored_options", [])
    if not isinstance(ignored, list) or any(name not in options for name in ignored):
        raise entry.fail("ignored_options", "must list options the entry accepts")
    spec = ModelSpec(
        id=product_id,
        display_name=entry.text("display_name", required=True),
        vendor=vendor,
        vendor_model=entry.text("vendor_model", required=True),
        strengths=entry.text("strengths"),
        min_width=entry.integer("min_width", MIN_SIDE, low=1),
        max_width=entry.integer("max_width", MAX_SIDE, low=1),
        min_height=entry.integer("min_height", MIN_SIDE, low=1),
        max_height=entry.integer("max_height", MAX_SIDE, low=1),
        max_variants=entry.integer("max_variants", MAX_VARIANTS, low=1),
        supports_seed=entry.boolean("supports_seed", False),
        supports_negative_prompt=entry.boolean("supports_negative_prompt", False),
        max_reference_images=entry.integer("max_reference_images", 0),
        output_formats=tuple(formats),
        option_values=options,
        ignored_options=frozenset(ignored),
        tiers=dict(tiers),
        size=_size(entry.sub("size")),
        price=_price(entry.sub("price"), sources),
        lifecycle=_lifecycle(entry, sources),
    )
    if spec.min_width > spec.max_width or spec.min_height > spec.max_height:
        raise entry.fail("min_width", "and min_height must not exceed max_width and max_height")
    return spec


def _product_id(entry: _Entry) -> str:
    product_id = entry.text("id", required=True)
    if not product_id.replace("_", "").isalnum() or not product_id.islower():
        raise entry.fail("id", "must be lower-case letters, digits and '_'")
    return product_id


def _options(entry: _Entry) -> dict[str, tuple[Any, ...] | type]:
    raw = entry.table.get("options", {})
    if not isinstance(raw, dict):
        raise entry.fail("options", "must be a table")
    options: dict[str, tuple[Any, ...] | type] = {}
    for key, allowed in raw.items():
        if allowed == "bool":
            options[key] = bool
        elif isinstance(allowed, list) and allowed and all(isinstance(v, str | int) for v in allowed):
            options[key] = tuple(allowed)
        else:
            raise entry.fail(f"options.{key}", 'must be "bool" or a non-empty list of allowed values')
    return options


def _size(entry: _Entry) -> SizeRule:
    rule = entry.text("rule", required=True)
    if rule not in _SIZE_KEYS:
        raise entry.fail("rule", f"must be one of {', '.join(_SIZE_KEYS)}, not {rule!r}")
    entry.only(_SIZE_KEYS[rule])
    if rule == "multiple":
        return SizeRule(
            rule=rule,
            step=entry.integer("step", 1, low=1),
            min_side=entry.integer("min_side", 1, low=1),
            min_pixels=entry.integer("min_pixels", 0),
            max_pixels=entry.integer("max_pixels", 0),
            max_side=entry.integer("max_side", 0),
            max_ratio=entry.number("max_ratio"),
        )
    ratios = entry.table.get("ratios")
    if (
        not isinstance(ratios, dict)
        or not ratios
        or not all(_is_ratio(name) and _is_pair(size) for name, size in ratios.items())
    ):
        raise entry.fail("ratios", 'must map "W:H" to [width, height] in pixels')
    tiers = entry.table.get("tiers", {})
    if not isinstance(tiers, dict) or not all(isinstance(v, int) and v >= 1 for v in tiers.values()):
        raise entry.fail("tiers", "must map tier names to whole scales >= 1, smallest first")
    return SizeRule(
        rule=rule,
        ratios={name: (size[0], size[1]) for name, size in ratios.items()},
        tiers=dict(sorted(tiers.items(), key=lambda item: item[1])),
    )


def _is_ratio(name: str) -> bool:
    width, sep, height = name.partition(":")
    return bool(sep) and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0


def _is_pair(size: object) -> bool:
    return isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)


def _price(entry: _Entry, sources: Mapping[str, str]) -> PriceRule:
    rule = entry.text("rule", required=True)
    if rule not in _PRICE_KEYS:
        raise entry.fail("rule", f"must be one of {', '.join(_PRICE_KEYS)}, not {rule!r}")
    entry.only(_PRICE_KEYS[rule])
    tokens = entry.table.get("output_tokens", {})
    if not isinstance(tokens, dict) or not all(isinstance(v, int) and v >= 0 for v in tokens.values()):
        raise entry.fail("output_tokens", "must map quality or tier names to token counts")
    estimate_by = entry.text("estimate_by", default="quality" if rule == "per_token" else "")
    if rule == "per_token":
        if estimate_by not in ("quality", "tier"):
            raise entry.fail("estimate_by", 'must be "quality" or "tier"')
        if entry.text("default_key", required=True) not in tokens:
            raise entry.fail("default_key", "must be a key of output_tokens")
    if rule == "per_image" and "usd" not in entry.table:
        raise entry.fail("usd", "is required")
    return PriceRule(
        rule=rule,
        usd=entry.number("usd"),
        first_megapixel_usd=entry.number("first_megapixel_usd"),
        further_megapixel_usd=entry.number("further_megapixel_usd"),
        reference_image_usd=entry.number("reference_image_usd"),
        text_input=entry.number("text_input"),
        image_input=entry.number("image_input"),
        image_output=entry.number("image_output"),
        text_output=entry.number("text_output"),
        estimate_by=estimate_by,
        default_key=entry.text("default_key"),
        output_tokens=dict(tokens),
        reference_image_tokens=entry.integer("reference_image_tokens", 0),
        summary=entry.text("summary", required=True),
        source=_source(entry, sources),
    )


def _lifecycle(parent: _Entry, sources: Mapping[str, str]) -> Lifecycle:
    entry = parent.sub("lifecycle")
    entry.only(_LIFECYCLE_KEYS)
    state = entry.text("state", default="active")
    if state not in STATES:
        raise entry.fail("state", f"must be one of {', '.join(STATES)}, not {state!r}")
    shutdown = entry.table.get("shutdown_date")
    if shutdown is not None and (not isinstance(shutdown, date) or hasattr(shutdown, "hour")):
        raise entry.fail("shutdown_date", "must be a date (YYYY-MM-DD, unquoted)")
    if state != "active" and shutdown is None and "alias_of" not in parent.table:
        raise entry.fail("shutdown_date", f"is required for a {state} model")
    if state != "active" and not entry.table.get("replacement"):
        raise entry.fail("replacement", f"is required for a {state} model")
    return Lifecycle(
        state=state,
        shutdown_date=shutdown,
        replacement=entry.table.get("replacement") or None,
        vendor_model=entry.text("vendor_model") or None,
        source=_source(entry, sources, required=True),
    )


def _source(entry: _Entry, sources: Mapping[str, str], *, required: bool = False) -> str:
    name = entry.text("source", required=required)
    if not name:
        return ""
    if name not in sources:
        raise entry.fail("source", f"names no entry of [sources]: {name!r}")
    return sources[name]


#: the catalog shipped with the service (servers load the one their settings name)
CATALOG: Catalog = load_catalog()
DEFAULT_MODEL = CATALOG.default
PRICE_TABLE_VERSION = CATALOG.version
