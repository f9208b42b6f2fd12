"""GenerateImage input rules: one pass that names every bad field, and the normalised spec otherwise."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import duration_pb2, json_format

from imagegen.v1 import imagegen_pb2 as pb
from providers.catalog import (
    CATALOG,
    MAX_PROMPT_CHARS,
    MAX_VARIANTS,
    Catalog,
    CostQuery,
    ModelSpec,
)
from providers.references import IPNetwork, host_problem
from storage.models import ROOT_FOLDER, JobSpec, utcnow

DEFAULT_SIDE = 1024
MAX_REQUEST_ID = 128
MAX_LABELS = 32
MAX_URL_CHARS = 2048
MAX_SEED = 2**32 - 1
MAX_TTL_S = 3650 * 86_400
MAX_FALLBACKS = 4

#: PostgreSQL text (and JSON) cannot hold NUL; nobody's prompt needs one
_NUL = "must not contain NUL characters"
_FOLDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

FORMAT_NAMES = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "png",
    pb.OUTPUT_FORMAT_PNG: "png",
    pb.OUTPUT_FORMAT_JPEG: "jpeg",
    pb.OUTPUT_FORMAT_WEBP: "webp",
}


@dataclass(frozen=True)
class FieldViolation:
    """One bad field and what is wrong with it (becomes a google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class InvalidRequest(Exception):
    """The request has bad fields; `violations` names each."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


@dataclass(frozen=True, kw_only=True)
class ValidatedRequest:
    """A GenerateImage request that passed validation."""

    spec: JobSpec
    #: the catalog model that serves the request (for an alias, the model it is an alias of)
    model: ModelSpec
    estimated_cost_usd_micros: int
    request_id: str
    #: the request's ttl in seconds; None when unset (the server's retention applies)
    ttl_s: float | None = None
    #: the vendor model the job is sent to
    served_model: str = ""
    #: what the job's first event says about the id (alias, deprecation), or ""
    notice: str = ""
    #: why the id is refused (its vendor model is retired and nothing serves it), or None
    refusal: str | None = None


def normalise_folder(folder_id: str) -> str:
    """ "" and "root" both mean the root folder, stored as ""."""
    return "" if folder_id in ("", ROOT_FOLDER) else folder_id


def folder_violation(folder_id: str, field: str = "folder_id") -> FieldViolation | None:
    """Folder ids become directory names: letters, digits, '_' and '-' only, so none escapes its account."""
    if folder_id in ("", ROOT_FOLDER) or _FOLDER_ID.fullmatch(folder_id):
        return None
    return FieldViolation(
        field, "must be 1-128 characters of letters, digits, '_' and '-', starting with a letter or digit"
    )


def validate_generate(
    request: pb.GenerateImageRequest,
    *,
    reference_allow: Sequence[IPNetwork] = (),
    catalog: Catalog = CATALOG,
    today: date | None = None,
) -> ValidatedRequest:
    """Check every field of a GenerateImage request; raise InvalidRequest naming all bad fields.

    A known id whose vendor model is retired passes, with `refusal` saying why it cannot run.
    """
    provider = request.provider.strip() or catalog.default
    bad: list[FieldViolation] = []
    notice, refusal = "", None
    if provider in catalog:
        resolution = catalog.resolve(provider, today or utcnow().date())
        entry, model = resolution.entry, resolution.model
        notice, refusal = resolution.notice, resolution.refusal
    else:
        bad.append(FieldViolation("provider", f"unknown provider {provider!r}; one of {', '.join(catalog)}"))
        # keep checking the other fields against the default's limits
        entry = model = catalog[catalog.default]
    # An alias is checked against what serves it, and its errors name the id the caller sent.
    limits = replace(model, id=entry.id) if entry.alias_of else model
    prompt, negative = request.prompt.strip(), request.negative_prompt.strip()
    width, height = request.width or DEFAULT_SIDE, request.height or DEFAULT_SIDE
    variants = request.num_variants or 1
    seed = request.seed if request.HasField("seed") else None
    output_format = FORMAT_NAMES.get(request.output_format)
    references = tuple(request.reference_image_urls)
    options = (
        json_format.MessageToDict(request.provider_options) if request.HasField("provider_options") else {}
    )
    fallback_ids = [name.strip() for name in request.fallback_providers]
    # a key naming a fallback holds that fallback's own options, not one of the primary's
    own_options = {key: options.pop(key) for key in fallback_ids if isinstance(options.get(key), dict)}
    options, option_violations = _check_options(limits, options) if options else ({}, [])
    labels = dict(request.labels)

    bad += _text_violations(request.prompt, prompt, negative)
    bad += _shape_violations(limits, width, height, variants)
    bad += _feature_violations(limits, seed, request.output_format, output_format)
    if references:  # most requests have none, nor options or labels: their checks are skipped
        bad += _reference_violations(limits, references, reference_allow)
    bad += option_violations
    if (violation := folder_violation(request.folder_id)) is not None:
        bad.append(violation)
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        bad.append(FieldViolation("request_id", f"must be 1-{MAX_REQUEST_ID} printable ASCII characters"))
    if labels:
        bad += _label_violations(labels)
    ttl_s = None
    if request.HasField("ttl"):
        ttl_s, ttl_problem = _ttl(request.ttl)
        if ttl_problem:
            bad.append(FieldViolation("ttl", ttl_problem))
    shape = _Shape(
        width=width,
        height=height,
        variants=variants,
        seed=seed,
        format_value=request.output_format,
        output_format=output_format,
        references=len(references),
        options=options,
    )
    fallbacks: list[tuple[ModelSpec, ModelSpec, dict[str, Any]]] = []
    if fallback_ids:
        fallbacks, fallback_violations = _check_fallbacks(
            catalog, entry.id, fallback_ids, own_options, shape, today or utcnow().date()
        )
        bad += fallback_violations
    if bad:
        raise InvalidRequest(bad)

    spec = JobSpec(
        prompt=prompt,
        provider=entry.id,
        width=width,
        height=height,
        num_variants=variants,
        folder_id=normalise_folder(request.folder_id),
        negative_prompt=negative,
        seed=seed,
        output_format=output_format or "png",
        reference_image_urls=references,
        provider_options=options,
        labels=labels,
        fallback_providers=tuple(fb_entry.id for fb_entry, _, _ in fallbacks),
        fallback_on_moderation=request.fallback_on_moderation and bool(fallbacks),
        fallback_options={fb_entry.id: fb_options for fb_entry, _, fb_options in fallbacks},
    )
    # A budget reserves the most expensive model of the chain; the job is billed at the one that served it.
    estimate = max(
        quote(chain_model, shape, chain_options)
        for chain_model, chain_options in [(model, options), *((m, o) for _, m, o in fallbacks)]
    )
    return ValidatedRequest(
        spec=spec,
        model=model,
        estimated_cost_usd_micros=estimate,
        request_id=request.request_id,
        ttl_s=ttl_s,
        served_model=model.vendor_model_for(options),
        notice=notice,
        refusal=refusal,
    )


def _ttl(ttl: duration_pb2.Duration) -> tuple[float, str]:
    """The ttl in seconds, and what is wrong with it ("" when nothing)."""
    if not -999_999_999 <= ttl.nanos <= 999_999_999 or (
        ttl.seconds and ttl.nanos and (ttl.seconds > 0) != (ttl.nanos > 0)
    ):
        return 0.0, "is not a valid google.protobuf.Duration"
    seconds = ttl.seconds + ttl.nanos / 1e9
    if seconds <= 0:
        return 0.0, "must be positive (leave it unset for the server's retention)"
    if seconds > MAX_TTL_S:
        return 0.0, f"must be at most {MAX_TTL_S // 86_400} days"
    return seconds, ""


@dataclass(frozen=True, kw_only=True)
class _Shape:
    """What a request asks of whichever model serves it."""

    width: int
    height: int
    variants: int
    seed: int | None
    format_value: int
    output_format: str | None
    references: int
    options: dict[str, Any]


def quote(model: ModelSpec, shape: _Shape, options: dict[str, Any]) -> int:
    """The model's quote for the request, in USD micros."""
    return model.estimate_usd_micros(
        CostQuery(
            width=shape.width,
            height=shape.height,
            num_variants=shape.variants,
            reference_images=shape.references,
            options=options,
        )
    )


def _check_fallbacks(
    catalog: Catalog,
    primary: str,
    names: list[str],
    own_options: dict[str, Any],
    shape: _Shape,
    today: date,
) -> tuple[list[tuple[ModelSpec, ModelSpec, dict[str, Any]]], list[FieldViolation]]:
    """Each fallback as (catalog entry, model serving it, its options), and why any cannot take the request.

    A fallback must honour the whole request: nothing it cannot do is dropped or changed on the way.
    """
    bad: list[FieldViolation] = []
    chain: list[tuple[ModelSpec, ModelSpec, dict[str, Any]]] = []
    if len(names) > MAX_FALLBACKS:
        bad.append(FieldViolation("fallback_providers", f"at most {MAX_FALLBACKS} fallbacks"))
    seen = {primary}
    for index, name in enumerate(names):
        field = f"fallback_providers[{index}]"
        if name not in catalog:
            bad.append(FieldViolation(field, f"unknown provider {name!r}; one of {', '.join(catalog)}"))
            continue
        resolution = catalog.resolve(name, today)
        entry, model = resolution.entry, resolution.model
        if entry.id in seen:
            bad.append(FieldViolation(field, f"{entry.id} is already in the chain"))
            continue
        seen.add(entry.id)
        if resolution.refusal is not None:
            bad.append(FieldViolation(field, resolution.refusal))
            continue
        limits = replace(model, id=entry.id) if entry.alias_of else model
        own = own_options.get(name)
        options, option_bad = _check_options(limits, dict(own if own is not None else shape.options))
        problems = [
            *_shape_violations(limits, shape.width, shape.height, shape.variants),
            *_feature_violations(limits, shape.seed, shape.format_value, shape.output_format),
        ]
        if shape.references > limits.max_reference_images:
            problems.append(
                FieldViolation(
                    "reference_image_urls",
                    f"{entry.id} takes no reference images"
                    if limits.max_reference_images == 0
                    else f"{entry.id} takes at most {limits.max_reference_images} reference images, "
                    f"got {shape.references}",
                )
            )
        for problem in option_bad:
            hint = "" if own is not None else f" (give its own options as provider_options.{entry.id})"
            problems.append(FieldViolation(problem.field, problem.description + hint))
        bad += [
            FieldViolation(field, f"{entry.id} cannot take this request's {p.field}: {p.description}")
            for p in problems
        ]
        chain.append((entry, model, options))
    return chain, bad


def _text_violations(raw_prompt: str, prompt: str, negative: str) -> list[FieldViolation]:
    bad = []
    if "\x00" in raw_prompt:
        bad.append(FieldViolation("prompt", _NUL))
    elif not prompt:
        bad.append(FieldViolation("prompt", "is required"))
    elif len(prompt) > MAX_PROMPT_CHARS:
        bad.append(
            FieldViolation("prompt", f"must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
        )
    if "\x00" in negative:
        bad.append(FieldViolation("negative_prompt", _NUL))
    elif len(negative) > MAX_PROMPT_CHARS:
        bad.append(FieldViolation("negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters"))
    return bad


def _shape_violations(model: ModelSpec, width: int, height: int, variants: int) -> list[FieldViolation]:
    bad = []
    if not model.min_width <= width <= model.max_width:
        bad.append(
            FieldViolation(
                "width", f"must be {model.min_width}-{model.max_width} for {model.id}, got {width}"
            )
        )
    if not model.min_height <= height <= model.max_height:
        bad.append(
            FieldViolation(
                "height", f"must be {model.min_height}-{model.max_height} for {model.id}, got {height}"
            )
        )
    most = min(MAX_VARIANTS, model.max_variants)
    if not 1 <= variants <= most:
        bad.append(FieldViolation("num_variants", f"must be 1-{most} for {model.id}, got {variants}"))
    return bad


def _feature_violations(
    model: ModelSpec, seed: int | None, format_value: int, output_format: str | None
) -> list[FieldViolation]:
    bad = []
    if seed is not None and not model.supports_seed:
        bad.append(FieldViolation("seed", f"{model.id} does not support seeds"))
    elif seed is not None and not 0 <= seed <= MAX_SEED:
        bad.append(FieldViolation("seed", f"must be 0-{MAX_SEED}"))
    if output_format is None:
        bad.append(FieldViolation("output_format", f"unknown value {format_value}"))
    elif output_format not in model.output_formats:
        bad.append(FieldViolation("output_format", f"{model.id} cannot produce {output_format}"))
    return bad


def _reference_violations(
    model: ModelSpec, references: tuple[str, ...], allow: Sequence[IPNetwork]
) -> list[FieldViolation]:
    bad = []
    limit = model.max_reference_images
    if len(references) > limit:
        bad.append(
            FieldViolation(
                "reference_image_urls",
                f"{model.id} takes no reference images"
                if limit == 0
                else f"{model.id} takes at most {limit} reference images, got {len(references)}",
            )
        )
    for index, url in enumerate(references):
        if (problem := _url_problem(url, allow)) is not None:
            bad.append(FieldViolation(f"reference_image_urls[{index}]", problem))
    return bad


def _label_violations(labels: dict[str, str]) -> list[FieldViolation]:
    bad = []
    if len(labels) > MAX_LABELS:
        bad.append(FieldViolation("labels", f"at most {MAX_LABELS} labels"))
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            bad.append(
                FieldViolation(
                    f"labels[{key}]", "keys are 1-63 of a-z, 0-9, '_', '.', '-' starting with a letter"
                )
            )
        elif len(value) > 256:
            bad.append(FieldViolation(f"labels[{key}]", "values are at most 256 characters"))
        elif "\x00" in value:
            bad.append(FieldViolation(f"labels[{key}]", _NUL))
    return bad


def _url_problem(url: str, allow: Sequence[IPNetwork]) -> str | None:
    if "\x00" in url:
        return _NUL
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    # The fetcher checks every address it connects to; refusing what it would refuse tells the caller
    # now rather than in a failed job (and vendors that fetch URLs themselves never see these).
    return host_problem(host, allow)


def _check_options(model: ModelSpec, options: dict[str, Any]) -> tuple[dict[str, Any], list[FieldViolation]]:
    clean: dict[str, Any] = {}
    bad: list[FieldViolation] = []
    for key, value in options.items():
        field = f"provider_options.{key}"
        allowed = model.option_values.get(key)
        if allowed is None:
            known = ", ".join(sorted(model.option_values)) or "none"
            bad.append(FieldViolation(field, f"{model.id} has no option {key!r} (its options: {known})"))
        elif allowed is bool:
            if isinstance(value, bool):
                clean[key] = value
            else:
                bad.append(FieldViolation(field, "must be true or false"))
        elif isinstance(allowed, tuple):
            # protobuf Struct numbers are doubles: 2.0 means the integer 2
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if value in allowed and not isinstance(value, bool):
                clean[key] = value
            else:
                bad.append(FieldViolation(field, f"must be one of {', '.join(map(str, allowed))}"))
    return clean, bad
