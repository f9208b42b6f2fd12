"""Domain errors into gRPC statuses (AIP-193), as data; rich details travel in grpc-status-details-bin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.validation import FieldViolation, InvalidRequest
from storage.errors import (
    BlobStoreUnavailable,
    IdempotencyConflict,
    InsufficientCredit,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    SchemaBehind,
    StorageError,
    StoreUnavailable,
)

_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    InsufficientCredit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InvalidTransition: grpc.StatusCode.FAILED_PRECONDITION,
    LeaseLost: grpc.StatusCode.ABORTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    BlobStoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}

#: how long a client should wait before retrying after UNAVAILABLE from the database
STORE_RETRY_DELAY_S = 1

# Errors echo what the caller sent (an unknown provider, a bad label key); bounded here, once, so that
# the trailers stay well under the 8 KiB of metadata a default client accepts, whatever the input.
_MAX_MESSAGE_BYTES = 512
_MAX_FIELD_BYTES = 128
_MAX_DESCRIPTION_BYTES = 256
#: all the violations listed, together (a request with every field wrong takes about 2 KiB)
_MAX_VIOLATION_BYTES = 4096


class ServiceError(Exception):
    """An RPC outcome decided by the servicer itself (not by a lower layer)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Overloaded(ServiceError):
    """Backpressure: the queue (or the caller's share of it) is full; try again after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_after_s = retry_after_s


def status_for(exc: Exception) -> grpc.StatusCode:
    """The gRPC code of an exception, by its most specific known class; INTERNAL for the unknown."""
    if isinstance(exc, ServiceError):
        return exc.code
    return next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), grpc.StatusCode.INTERNAL)


def bad_request(violations: Sequence[FieldViolation]) -> any_pb2.Any:
    """google.rpc.BadRequest naming every bad field."""
    listed: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for index, violation in enumerate(violations):
        field = clip(violation.field, _MAX_FIELD_BYTES)
        description = clip(violation.description, _MAX_DESCRIPTION_BYTES)
        size += len(field.encode()) + len(description.encode())
        if size > _MAX_VIOLATION_BYTES:
            listed.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field="...", description=f"and {len(violations) - index} more bad fields"
                )
            )
            break
        listed.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=listed))
    return detail


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (on a character boundary), ending in "..." when cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "..."


def quota_failure(subject: str, description: str) -> any_pb2.Any:
    """google.rpc.QuotaFailure: which quota is exhausted."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)]
        )
    )
    return detail


def retry_info(seconds: float) -> any_pb2.Any:
    """google.rpc.RetryInfo: when trying again makes sense."""
    detail = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return detail


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:  # type: ignore[type-arg]
    """End the RPC with the status `exc` maps to, with BadRequest / RetryInfo details where they apply."""
    code = status_for(exc)
    message = exc.message if isinstance(exc, ServiceError) else str(exc)
    details: list[any_pb2.Any] = []
    if isinstance(exc, InvalidRequest):
        details.append(bad_request(exc.violations))
    elif isinstance(exc, InsufficientCredit):
        details.append(quota_failure(f"account:{exc.account_id}", str(exc)))
    elif isinstance(exc, Overloaded):
        details.append(retry_info(exc.retry_after_s))
    elif isinstance(exc, SchemaBehind):
        message = f"this server cannot serve yet: {exc}"
        details.append(retry_info(STORE_RETRY_DELAY_S))
    elif isinstance(exc, StoreUnavailable):
        message = "the job database is unreachable; try again"
        details.append(retry_info(STORE_RETRY_DELAY_S))
    elif isinstance(exc, BlobStoreUnavailable):
        message = "the image store is unreachable; try again"
        details.append(retry_info(STORE_RETRY_DELAY_S))
    elif code is grpc.StatusCode.INTERNAL and not isinstance(exc, (StorageError, ServiceError)):
        message = "internal error"  # never a stack trace or driver text to the caller
    status = rpc_status.to_status(
        status_pb2.Status(
            code=getattr(code_pb2, code.name), message=clip(message, _MAX_MESSAGE_BYTES), details=details
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")
