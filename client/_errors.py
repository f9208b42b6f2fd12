"""The client's errors: one class per gRPC status a caller handles differently, rich details parsed."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

#: the trailer in which servers send a google.rpc.Status with typed details (AIP-193)
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ImagegenError(Exception):
    """Any failed call to the imagegen service; `code` is the gRPC status, `message` the server's words."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, retry_after: float | None = None
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        #: seconds the server asked the caller to wait before trying again (google.rpc.RetryInfo), if any
        self.retry_after = retry_after
        super().__init__(f"{self.code.name}: {message}")


class InvalidArgument(ImagegenError):
    """The request has bad fields; `field_violations` maps each bad field to what is wrong with it."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        retry_after: float | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.field_violations: dict[str, str] = dict(field_violations or {})


class NotFound(ImagegenError):
    """No such job in the caller's account."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ImagegenError):
    """A request_id was reused with a different request body."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ImagegenError):
    """The request is valid but the state forbids it (a finished job, a provider not configured)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ImagegenError):
    """The server could not be reached or its database is down; retrying later may succeed."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ImagegenError):
    """The call's deadline passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ImagegenError):
    """The server did not accept the caller's credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ImagegenError):
    """The caller may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ImagegenError):
    """A quota or a queue is full; `retry_after` says when to try again, when the server said."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE: Mapping[grpc.StatusCode, type[ImagegenError]] = MappingProxyType(
    {
        cls.default_code: cls
        for cls in (
            InvalidArgument,
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            Unavailable,
            DeadlineExceeded,
            Unauthenticated,
            PermissionDenied,
            ResourceExhausted,
        )
    }
)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a server put in the trailers, or None when it sent none (or garbage)."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer must not hide the status code itself
                return None
    return None


def from_rpc_error(error: grpc.aio.AioRpcError) -> ImagegenError:
    """The ImagegenError subclass matching a gRPC failure, with its BadRequest and RetryInfo parsed."""
    code = error.code()
    message = error.details() or code.name.lower()
    violations: dict[str, str] = {}
    retry_after: float | None = None
    status = rich_status(error)
    for detail in status.details if status is not None else ():
        violations.update(_field_violations(detail))
        retry_after = _retry_delay(detail) if retry_after is None else retry_after
    cls = _BY_CODE.get(code, ImagegenError)
    if cls is InvalidArgument:
        return InvalidArgument(message, code=code, retry_after=retry_after, field_violations=violations)
    return cls(message, code=code, retry_after=retry_after)


def _field_violations(detail: any_pb2.Any) -> dict[str, str]:
    request = error_details_pb2.BadRequest()
    if not detail.Unpack(request):
        return {}
    return {violation.field: violation.description for violation in request.field_violations}


def _retry_delay(detail: any_pb2.Any) -> float | None:
    info = error_details_pb2.RetryInfo()
    if not detail.Unpack(info):
        return None
    return float(info.retry_delay.ToNanoseconds()) / 1e9
