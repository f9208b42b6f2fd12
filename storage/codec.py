"""Jobs to and from their rows and JSON: the row codec, the event snapshot, and the spec digest.

Pure functions over `storage.models` types; the SQL lives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy
from sqlalchemy import Row

from storage.models import Job, JobError, JobEvent, JobNotice, JobSpec, JobStatus, StoredImage
from storage.schema import jobs

#: JSON text for the driver's statements, from one shared encoder: `json.dumps` with arguments builds an
#: encoder per call, and a submit encodes six values. No circular check: these are plain data.
json_text = json.JSONEncoder(check_circular=False).encode
#: the canonical text of a spec, whose digest is stored with each job: it must never change
canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=False
).encode


def spec_hash(spec: JobSpec) -> str:
    """A digest of the canonical request, to tell a retried submit from a different one."""
    canonical = spec.to_json()
    if not spec.fallback_providers:
        # the digest of a request without fallbacks is what it was before they existed
        for key in _FALLBACK_KEYS:
            del canonical[key]
    return hashlib.sha256(canonical_json(canonical).encode()).hexdigest()


_FALLBACK_KEYS = ("fallback_providers", "fallback_on_moderation", "fallback_options")


#: the jobs columns kept as JSON
JSON_COLUMNS = frozenset(column.name for column in jobs.c if isinstance(column.type, sqlalchemy.JSON))

#: the jobs columns a fenced transition may set that are Job fields of the same name and value
PLAIN_TRANSITION_COLUMNS = frozenset(
    (
        "cost_usd_micros",
        "end_time",
        "lease_owner",
        "lease_expires_at",
        "next_attempt_at",
        "active_provider",
        "attempt_base",
        "served_model",
    )
)


def job_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A fenced transition's column `values` as Job fields (for a transition from the claimed job)."""
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if name in PLAIN_TRANSITION_COLUMNS:
            fields[name] = value
        elif name == "images":
            fields["images"] = tuple(StoredImage.from_json(image) for image in value)
        elif name == "error_code":
            error = JobError(
                code=value, message=values["error_message"] or "", retryable=bool(values["error_retryable"])
            )
            fields["error"] = error if value else None
        elif name not in ("error_message", "error_retryable"):
            raise TypeError(f"jobs.{name} has no Job field mapping for a fenced transition")
    return fields


#: the jobs columns whose values `SqlJobStore.create` gives every job alike: sent once per batch of creates
CREATED_ALIKE = (
    "status",
    "version",
    "attempt",
    "images",
    "attempt_base",
    "cost_usd_micros",
    "reserved_usd_micros",
)


def created_row(job: Job, request_hash: str) -> dict[str, Any]:
    """The rest of `job_values` for a job `SqlJobStore.create` made, as JSON values.

    Ids and times go as text already, so the plain `json_text` encodes the batch without a `default`
    hook's Python call per value; the columns every job has alike (`CREATED_ALIKE`) are sent once. The
    job was created, updated and made due at the same instant.
    """
    created = job.create_time.isoformat()
    return {
        "id": str(job.id),
        "account_id": job.account_id,
        "request_id": job.request_id or None,
        "request_hash": request_hash,
        **spec_values(job.spec),
        "deadline_at": job.deadline_at.isoformat(),
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        # per job: an alias's or a deprecation's notice rides on its first event
        "message": job.message,
        "served_model": job.served_model,
        "active_provider": job.active_provider,
        "create_time": created,
        "update_time": created,
        "next_attempt_at": created,
        "expire_time": job.expire_time.isoformat() if job.expire_time else None,
        "trace_context": job.trace_context,
    }


def notice(job: Job) -> JobNotice:
    """What the event hub is told of a job's new version."""
    return JobNotice(job_id=job.id, version=job.version, status=job.status, account_id=job.account_id)


def notice_from_row(row: Row[Any, Any, Any, Any]) -> JobNotice:
    """`notice` from a row of (id, version, status, account_id)."""
    return JobNotice(
        job_id=row.id, version=row.version, status=JobStatus(row.status), account_id=row.account_id
    )


def job_values(job: Job, request_hash: str) -> dict[str, Any]:
    """A new job as the jobs row to insert."""
    return {
        "id": job.id,
        "account_id": job.account_id,
        "request_id": job.request_id or None,
        "request_hash": request_hash,
        "status": job.status.value,
        "version": job.version,
        "attempt": job.attempt,
        **spec_values(job.spec),
        "next_attempt_at": job.next_attempt_at,
        "deadline_at": job.deadline_at,
        "images": [],
        "message": job.message,
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        "cost_usd_micros": 0,
        "reserved_usd_micros": job.reserved_usd_micros,
        "served_model": job.served_model,
        "active_provider": job.active_provider,
        "attempt_base": job.attempt_base,
        "create_time": job.create_time,
        "update_time": job.update_time,
        "expire_time": job.expire_time,
        "trace_context": job.trace_context,
    }


def spec_values(spec: JobSpec) -> dict[str, Any]:
    """A job's spec as jobs columns (`job_values`, `created_row`)."""
    return {
        "provider": spec.provider,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "width": spec.width,
        "height": spec.height,
        "num_variants": spec.num_variants,
        "seed": spec.seed,
        "output_format": spec.output_format,
        "folder_id": spec.folder_id,
        "reference_image_urls": list(spec.reference_image_urls),
        "provider_options": dict(spec.provider_options),
        "labels": dict(spec.labels),
        "fallback_providers": list(spec.fallback_providers),
        "fallback_on_moderation": spec.fallback_on_moderation,
        "fallback_options": {key: dict(value) for key, value in spec.fallback_options.items()},
    }


def job_from_row(row: Row[Any] | Mapping[str, Any]) -> Job:
    """A job from a jobs row: SQLAlchemy's, or a mapping of its columns (an asyncpg record)."""
    m = row._mapping if isinstance(row, Row) else row
    error = (
        JobError(code=m["error_code"], message=m["error_message"] or "", retryable=bool(m["error_retryable"]))
        if m["error_code"]
        else None
    )
    return Job(
        id=m["id"],
        account_id=m["account_id"],
        status=JobStatus(m["status"]),
        spec=JobSpec(
            prompt=m["prompt"],
            provider=m["provider"],
            width=m["width"],
            height=m["height"],
            num_variants=m["num_variants"],
            folder_id=m["folder_id"],
            negative_prompt=m["negative_prompt"],
            seed=m["seed"],
            output_format=m["output_format"],
            reference_image_urls=tuple(m["reference_image_urls"]),
            provider_options=m["provider_options"],
            labels=m["labels"],
            fallback_providers=tuple(m["fallback_providers"]),
            fallback_on_moderation=m["fallback_on_moderation"],
            fallback_options=m["fallback_options"],
        ),
        request_id=m["request_id"] or "",
        images=tuple(StoredImage.from_json(image) for image in m["images"]),
        error=error,
        estimated_cost_usd_micros=m["estimated_cost_usd_micros"],
        cost_usd_micros=m["cost_usd_micros"],
        reserved_usd_micros=m["reserved_usd_micros"],
        attempt=m["attempt"],
        version=m["version"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        start_time=m["start_time"],
        end_time=m["end_time"],
        deadline_at=m["deadline_at"],
        next_attempt_at=m["next_attempt_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        provider_state=m["provider_state"],
        message=m["message"],
        expire_time=m.get("expire_time"),
        served_model=m["served_model"],
        active_provider=m["active_provider"],
        attempt_base=m["attempt_base"],
        trace_context=m["trace_context"],
    )


def job_to_json(job: Job) -> dict[str, Any]:
    """The job as JSON, as kept in each event row (lease fields left out: they are not history)."""
    return {
        "id": str(job.id),
        "account_id": job.account_id,
        "status": job.status.value,
        "spec": job.spec.to_json(),
        "request_id": job.request_id,
        "images": [image.to_json() for image in job.images],
        "error": None
        if job.error is None
        else {"code": job.error.code, "message": job.error.message, "retryable": job.error.retryable},
        "estimated_cost_usd_micros": job.estimated_cost_usd_micros,
        "cost_usd_micros": job.cost_usd_micros,
        "attempt": job.attempt,
        "version": job.version,
        "create_time": job.create_time.isoformat(),
        "update_time": job.update_time.isoformat(),
        "start_time": job.start_time.isoformat() if job.start_time else None,
        "end_time": job.end_time.isoformat() if job.end_time else None,
        "deadline_at": job.deadline_at.isoformat(),
        "message": job.message,
        "expire_time": job.expire_time.isoformat() if job.expire_time else None,
        "served_model": job.served_model,
        "active_provider": job.active_provider,
        "attempt_base": job.attempt_base,
    }


def job_from_json(data: Mapping[str, Any]) -> Job:
    """Inverse of `job_to_json`."""
    spec = dict(data["spec"])
    spec["reference_image_urls"] = tuple(spec["reference_image_urls"])
    spec["fallback_providers"] = tuple(spec.get("fallback_providers", ()))
    error = data["error"]

    def when(key: str) -> datetime | None:
        value = data[key]
        return datetime.fromisoformat(value) if value else None

    return Job(
        id=uuid.UUID(data["id"]),
        account_id=data["account_id"],
        status=JobStatus(data["status"]),
        spec=JobSpec(**spec),
        request_id=data["request_id"],
        images=tuple(StoredImage.from_json(image) for image in data["images"]),
        error=None if error is None else JobError(**error),
        estimated_cost_usd_micros=data["estimated_cost_usd_micros"],
        cost_usd_micros=data["cost_usd_micros"],
        attempt=data["attempt"],
        version=data["version"],
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        start_time=when("start_time"),
        end_time=when("end_time"),
        deadline_at=datetime.fromisoformat(data["deadline_at"]),
        message=data["message"],
        expire_time=when("expire_time") if "expire_time" in data else None,
        # events written before the column existed have none
        served_model=data.get("served_model", ""),
        active_provider=data.get("active_provider", ""),
        attempt_base=data.get("attempt_base", 0),
    )


def event_from_row(row: Row[Any]) -> JobEvent:
    """An event from its job_events row."""
    m = row._mapping
    previous = m["previous_status"]
    return JobEvent(
        job=job_from_json(m["snapshot"]),
        version=m["version"],
        previous_status=JobStatus(previous) if previous else None,
        event_time=m["event_time"],
        message=m["message"],
    )
