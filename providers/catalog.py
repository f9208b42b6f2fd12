"""The model catalog: what each model can do, what it costs and how long its vendor keeps it, as data.

The data is `catalog.toml` beside this module (or the operator's copy named by IMAGEGEN_CATALOG_FILE),
checked whole at load: a bad entry raises `CatalogError` naming the entry and the field. Prices are USD
micros (1 USD = 1,000,000). The estimate is what a job is quoted at submit; the vendor's own usage
figure, where it reports one, replaces it at completion.

A product id is either a model (a vendor model with its limits, options, size rule and price rule) or an
alias of one (`alias_of`): an id callers still send after its vendor model was retired, served by
another model of the catalog, with a notice on each job.

The types a catalog is made of are in `providers.specs`, the checking of the file in
`providers.catalog_file`; their public names are re-exported here, where the rest of the service
imports them from.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from providers.catalog_file import check_catalog
from providers.specs import (
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_VARIANTS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    STATES,
    VENDORS,
    CatalogError,
    CostQuery,
    Lifecycle,
    ModelSpec,
    NativeSize,
    PriceRule,
    SizeRule,
    bfl_native_size,
    usd_micros_to_cents,
)

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "MAX_PROMPT_CHARS",
    "MAX_SIDE",
    "MAX_VARIANTS",
    "MIN_SIDE",
    "OUTPUT_FORMATS",
    "PRICE_TABLE_VERSION",
    "SHIPPED_CATALOG_FILE",
    "STATES",
    "VENDORS",
    "Catalog",
    "CatalogError",
    "CostQuery",
    "Lifecycle",
    "ModelSpec",
    "NativeSize",
    "PriceRule",
    "Resolution",
    "SizeRule",
    "bfl_native_size",
    "load_catalog",
    "usd_micros_to_cents",
]

#: the catalog shipped with the service
SHIPPED_CATALOG_FILE = Path(__file__).with_name("catalog.toml")


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
        checked = check_catalog(data)
    except CatalogError as exc:
        raise CatalogError(f"catalog file {path}: {exc}") from None
    return Catalog(checked.models, version=checked.version, default=checked.default, source=str(path))


#: the catalog shipped with the service (servers load the one their settings name)
CATALOG: Catalog = load_catalog()
DEFAULT_MODEL = CATALOG.default
PRICE_TABLE_VERSION = CATALOG.version
