"""Checking a parsed catalog file into model specs: every table and field, with errors that name them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from providers.specs import (
    MAX_SIDE,
    MAX_VARIANTS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    STATES,
    VENDORS,
    CatalogError,
    Lifecycle,
    ModelSpec,
    PriceRule,
    SizeRule,
)


@dataclass(frozen=True, kw_only=True)
class CheckedCatalog:
    """A catalog file's content, checked: its product ids in file order, version and default id."""

    models: dict[str, ModelSpec]
    version: str
    default: str


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


def check_catalog(data: dict[str, Any]) -> CheckedCatalog:
    """Check a parsed catalog file whole; raises CatalogError naming the first bad entry and field."""
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
    return CheckedCatalog(models=models, version=version, default=default)


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
