"""GenerateImage input rules: one pass that names every bad field, and the normalised spec otherwise."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format

from imagegen.v1 import imagegen_pb2 as pb
from providers.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    MAX_PROMPT_CHARS,
    MAX_VARIANTS,
    CostQuery,
    ModelSpec,
)
from providers.references import IPNetwork, host_problem
from storage.models import ROOT_FOLDER, JobSpec

DEFAULT_SIDE = 1024
MAX_REQUEST_ID = 128
MAX_LABELS = 32
MAX_URL_CHARS = 2048
MAX_SEED = 2**32 - 1

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
    model: ModelSpec
    estimated_cost_usd_micros: int
    request_id: str


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
    request: pb.GenerateImageRequest, *, reference_allow: Sequence[IPNetwork] = ()
) -> ValidatedRequest:
    """Check every field of a GenerateImage request; raise InvalidRequest naming all bad fields."""
    provider = request.provider.strip() or DEFAULT_MODEL
    model = CATALOG.get(provider)
    bad: list[FieldViolation] = []
    if model is None:
        bad.append(FieldViolation("provider", f"unknown provider {provider!r}; one of {', '.join(CATALOG)}"))
        model = CATALOG[DEFAULT_MODEL]  # keep checking the other fields against the default's limits
    prompt, negative = request.prompt.strip(), request.negative_prompt.strip()
    width, height = request.width or DEFAULT_SIDE, request.height or DEFAULT_SIDE
    variants = request.num_variants or 1
    seed = request.seed if request.HasField("seed") else None
    output_format = FORMAT_NAMES.get(request.output_format)
    references = tuple(request.reference_image_urls)
    options = (
        json_format.MessageToDict(request.provider_options) if request.HasField("provider_options") else {}
    )
    options, option_violations = _check_options(model, options) if options else ({}, [])
    labels = dict(request.labels)

    bad += _text_violations(request.prompt, prompt, negative)
    bad += _shape_violations(model, width, height, variants)
    bad += _feature_violations(model, seed, request.output_format, output_format)
    if references:  # most requests have none, nor options or labels: their checks are skipped
        bad += _reference_violations(model, references, reference_allow)
    bad += option_violations
    if (violation := folder_violation(request.folder_id)) is not None:
        bad.append(violation)
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        bad.append(FieldViolation("request_id", f"must be 1-{MAX_REQUEST_ID} printable ASCII characters"))
    if labels:
        bad += _label_violations(labels)
    if bad:
        raise InvalidRequest(bad)

    spec = JobSpec(
        prompt=prompt,
        provider=model.id,
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
    )
    estimate = model.estimate_usd_micros(
        CostQuery(
            width=width,
            height=height,
            num_variants=variants,
            reference_images=len(references),
            options=options,
        )
    )
    return ValidatedRequest(
        spec=spec, model=model, estimated_cost_usd_micros=estimate, request_id=request.request_id
    )


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
