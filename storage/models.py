"""Domain types of the job store: jobs, their events, and the lifecycle rules.

These are plain frozen dataclasses; SQL rows never leave `storage/`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any


class JobStatus(enum.StrEnum):
    """Where a job is in its lifecycle (the strings are what the database stores)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether no transition leaves this status."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: every status change the store performs; anything else is a bug
ALLOWED_TRANSITIONS: Mapping[JobStatus | None, frozenset[JobStatus]] = {
    None: frozenset({JobStatus.PENDING}),
    # PENDING -> FAILED: the deadline passed while the job waited (no worker, or the vendor's cap was full)
    JobStatus.PENDING: frozenset({JobStatus.PROCESSING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.PROCESSING: frozenset(
        # PROCESSING -> PROCESSING is a lease taken over from a worker that died
        {JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

#: the folder id under which images of jobs without a folder are stored
ROOT_FOLDER = "root"


@dataclass(frozen=True, kw_only=True)
class StoredImage:
    """One stored output image; `key` is its blob-store key, turned into a signed URL when served."""

    key: str
    width: int
    height: int
    content_type: str
    size_bytes: int
    sha256: str
    seed: int | None = None
    native_width: int = 0
    native_height: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in the jobs table and in event snapshots."""
        return {
            "key": self.key,
            "width": self.width,
            "height": self.height,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "seed": self.seed,
            "native_width": self.native_width,
            "native_height": self.native_height,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredImage:
        """Inverse of `to_json`."""
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class JobError:
    """Why a job failed (or why its last attempt did, while it waits to retry)."""

    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A validated, normalised generation request: what a job was asked to do."""

    prompt: str
    provider: str
    width: int
    height: int
    num_variants: int
    folder_id: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    output_format: str = "png"
    reference_image_urls: tuple[str, ...] = ()
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    #: models to continue on, in order, when `provider` cannot serve the job
    fallback_providers: tuple[str, ...] = ()
    #: whether a moderation refusal also moves the job to the next model
    fallback_on_moderation: bool = False
    #: each fallback's options, validated for it at submit
    fallback_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def chain(self) -> tuple[str, ...]:
        """Every model the job may run on, in order: `provider`, then the fallbacks."""
        return (self.provider, *self.fallback_providers)

    def options_for(self, provider: str) -> Mapping[str, Any]:
        """The options of one model of the chain."""
        return self.provider_options if provider == self.provider else self.fallback_options.get(provider, {})

    def to_json(self) -> dict[str, Any]:
        """A canonical JSON form: equal specs give equal JSON (used for idempotency checks)."""
        return {
            "prompt": self.prompt,
            "provider": self.provider,
            "width": self.width,
            "height": self.height,
            "num_variants": self.num_variants,
            "folder_id": self.folder_id,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "output_format": self.output_format,
            "reference_image_urls": list(self.reference_image_urls),
            "provider_options": dict(self.provider_options),
            "labels": dict(self.labels),
            "fallback_providers": list(self.fallback_providers),
            "fallback_on_moderation": self.fallback_on_moderation,
            "fallback_options": {key: dict(value) for key, value in self.fallback_options.items()},
        }


@dataclass(frozen=True, kw_only=True)
class NewJob:
    """What `JobStore.create` persists."""

    account_id: str
    spec: JobSpec
    estimated_cost_usd_micros: int
    request_id: str = ""
    #: how long the job may take overall, from its creation
    deadline_s: float = 300.0
    #: how long after its creation the job is deleted (request ttl or server retention); None: never
    expire_after_s: float | None = None
    #: the vendor model the job is sent to, as the catalog resolved it at submit
    served_model: str = ""
    #: said in the job's first event (an alias or a deprecation of the id asked for), after "accepted"
    notice: str = ""
    #: the submitting span's W3C traceparent, when the submit was traced
    trace_context: str | None = None


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job as stored."""

    id: uuid.UUID
    account_id: str
    status: JobStatus
    spec: JobSpec
    request_id: str = ""
    images: tuple[StoredImage, ...] = ()
    error: JobError | None = None
    estimated_cost_usd_micros: int = 0
    cost_usd_micros: int = 0
    #: what was reserved from the account's budget at submit (0 when the account has none)
    reserved_usd_micros: int = 0
    attempt: int = 0
    version: int = 1
    create_time: datetime
    update_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    deadline_at: datetime
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    #: adapter scratch space (vendor task ids) kept across attempts; see providers.base.Checkpoint
    provider_state: Mapping[str, Any] | None = None
    #: the message of the latest transition
    message: str = ""
    #: when the retention sweeper deletes the job (once it is terminal); None: kept until DeleteJob
    expire_time: datetime | None = None
    #: the vendor model the job is sent to, recorded at submit ("" for jobs from before it was recorded);
    #: after a fallback, the fallback's
    served_model: str = ""
    #: the model of the chain the job runs on ("" for jobs from before fallbacks: `spec.provider`)
    active_provider: str = ""
    #: attempts spent on the chain's earlier models, or waiting out an open breaker: `attempt` minus this
    #: is the attempt on `serving_provider`
    attempt_base: int = 0
    #: the submitting span's W3C traceparent (attempts link to it), or None
    trace_context: str | None = None

    @property
    def serving_provider(self) -> str:
        """The model of the chain the job runs on, or that served it."""
        return self.active_provider or self.spec.provider

    @property
    def model_attempt(self) -> int:
        """Which attempt on `serving_provider` the latest claim is."""
        return self.attempt - self.attempt_base

    def evolve(self, **changes: Any) -> Job:
        """A copy with some fields changed."""
        return replace(self, **changes)


class EventKind(enum.StrEnum):
    """Why a watcher receives an event."""

    SNAPSHOT = "snapshot"
    TRANSITION = "transition"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One transition of one job, with the whole job as of that version."""

    job: Job
    version: int
    previous_status: JobStatus | None
    event_time: datetime
    message: str = ""
    kind: EventKind = EventKind.TRANSITION


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One change of an account's balance."""

    id: int
    account_id: str
    job_id: uuid.UUID | None
    #: set | add | reserve | settle | refund
    kind: str
    amount_usd_micros: int
    balance_usd_micros: int
    time: datetime
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class JobNotice:
    """The small wake-up sent after a transition commits (PostgreSQL NOTIFY payload or in-process)."""

    job_id: uuid.UUID
    version: int
    status: JobStatus
    account_id: str

    def encode(self) -> str:
        """One line of a NOTIFY payload: at most 187 characters (a 128-character account id)."""
        return f"{self.job_id} {self.version} {self.status.value} {self.account_id}"

    @classmethod
    def decode(cls, line: str) -> JobNotice:
        """Inverse of `encode`; raises ValueError on a foreign line."""
        job_id, version, status, account_id = line.split(" ", 3)
        return cls(
            job_id=uuid.UUID(job_id), version=int(version), status=JobStatus(status), account_id=account_id
        )


#: notices per NOTIFY payload, one per line: 40 of the longest stay under PostgreSQL's 8000-byte limit
NOTICES_PER_NOTIFY = 40


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the one clock of the store)."""
    return datetime.now(UTC)
