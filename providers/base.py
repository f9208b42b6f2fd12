"""The one interface every vendor adapter implements, and the errors adapters raise.

The worker only knows this module: it hands an adapter a `GenerationRequest` and a `Checkpoint`,
receives a `GenerationResult` (raw image bytes as the vendor delivered them) or a `ProviderError`,
and decides retries from `ProviderError.retryable` and `retry_after_s`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A validated, normalised request for one job attempt."""

    job_id: str
    #: model id from the catalog, e.g. "flux_2_pro"
    model: str
    prompt: str
    width: int
    height: int
    num_variants: int
    negative_prompt: str | None = None
    seed: int | None = None
    #: "png" | "jpeg" | "webp": the format the service will store; adapters may ask the vendor for it
    output_format: str = "png"
    reference_image_urls: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    #: what `Checkpoint.save` stored during an earlier attempt of this job, or None
    resume_state: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ProviderImage:
    """One image exactly as the vendor delivered it (not yet resized)."""

    data: bytes
    content_type: str
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """What an adapter returns when every requested variant was produced."""

    images: tuple[ProviderImage, ...]
    #: the vendor's own figure for what this cost, when it reports one (exact, in USD micros)
    cost_usd_micros: int | None = None
    #: vendor identifiers worth keeping with the job (task ids, request ids), for support tickets
    vendor_refs: Mapping[str, Any] = field(default_factory=dict)


class Checkpoint(Protocol):
    """Durable per-job scratch space for adapters of async vendors.

    An adapter that submits a task and then waits for it saves the vendor's task id (and polling URL)
    before waiting, so that a worker which re-claims the job after a crash resumes the same task
    instead of paying for a second one. The saved mapping comes back as `GenerationRequest.resume_state`.
    """

    async def save(self, state: Mapping[str, Any]) -> None:
        """Persist `state` for this job; raises if this worker no longer holds the job."""


class ImageProvider(Protocol):
    """A vendor API adapter."""

    #: the vendor API's name, for logs and metrics ("bfl", "openai", "ark", "gemini")
    vendor: str

    async def generate(self, request: GenerationRequest, checkpoint: Checkpoint) -> GenerationResult:
        """Produce `request.num_variants` images or raise `ProviderError`."""


class RetryReason(enum.StrEnum):
    """Why a transient failure happened: a bounded label for metrics and logs."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    #: the connection failed, dropped, or cut a body short
    CONNECTION = "connection"
    OTHER = "other"

    @classmethod
    def of_status(cls, status: int) -> RetryReason:
        """The reason an HTTP status gives."""
        if status == 429:
            return cls.RATE_LIMITED
        if status in (408, 504):
            return cls.TIMEOUT
        if status >= 500:
            return cls.SERVER_ERROR
        return cls.OTHER

    @classmethod
    def of_transport(cls, exc: BaseException) -> RetryReason:
        """The reason a transport failure (no HTTP answer) gives."""
        return cls.TIMEOUT if isinstance(exc, TimeoutError) else cls.CONNECTION


class ProviderError(Exception):
    """The provider did not produce the images."""

    #: the `Job.error.code` this failure is recorded under
    code: ClassVar[str] = "PROVIDER_ERROR"
    #: whether trying the same request again may succeed
    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, reason: RetryReason = RetryReason.OTHER
    ) -> None:
        super().__init__(message)
        self.message = message
        #: the vendor's own hint (Retry-After, RetryInfo) of how long to wait before trying again
        self.retry_after_s = retry_after_s
        #: why it happened, for a retryable failure's metrics and logs
        self.reason = reason


class ProviderUnavailable(ProviderError):
    """Unreachable, timed out, throttled (429), 5xx, dropped connection or truncated body."""

    code = "PROVIDER_UNAVAILABLE"
    retryable = True


class ContentModerated(ProviderError):
    """The vendor's safety system refused the prompt, a reference image, or its own output."""

    code = "CONTENT_MODERATED"


class InvalidProviderResponse(ProviderError):
    """The vendor answered success but gave no usable image, or an unreadable body."""

    code = "INVALID_PROVIDER_RESPONSE"


class ProviderRejected(ProviderError):
    """The vendor refused the request as invalid (4xx other than auth, throttling and moderation)."""

    code = "PROVIDER_REJECTED"


class ProviderAuthError(ProviderError):
    """The vendor refused our credentials (401/403) or has no credit left (402)."""

    code = "PROVIDER_AUTH"
