"""The imagegen SDK: a typed asyncio client of the imagegen gRPC service, and the `imagegen` command line.

async with ImagegenClient.connect("127.0.0.1:50051") as client:
    job = await client.generate("a red fox in the snow", width=1080, height=1920, num_variants=3)
    done = await client.wait(job.id, timeout=300)
"""

from __future__ import annotations

from client._client import (
    OUTPUT_FORMATS,
    TERMINAL_STATUSES,
    ImagegenClient,
    OutputFormatName,
    RetryPolicy,
    __version__,
    is_terminal,
    job_status,
    status_name,
)
from client._download import DownloadError
from client._errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    ImagegenError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from imagegen.v1 import imagegen_pb2 as pb

__all__ = [
    "OUTPUT_FORMATS",
    "TERMINAL_STATUSES",
    "AlreadyExists",
    "DeadlineExceeded",
    "DownloadError",
    "FailedPrecondition",
    "ImagegenClient",
    "ImagegenError",
    "InvalidArgument",
    "NotFound",
    "OutputFormatName",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "from_rpc_error",
    "is_terminal",
    "job_status",
    "pb",
    "status_name",
]
