"""Test helpers: read rich error details, follow a job to its end, wait for conditions with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from google.rpc import error_details_pb2, status_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from storage.models import JobSpec

TERMINAL = {pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED}


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in the trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status details in {error!r}")


def bad_fields(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """{field: description} of the BadRequest detail of an INVALID_ARGUMENT error."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    for detail in status_details(error).details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            return {v.field: v.description for v in request.field_violations}
    raise AssertionError("no BadRequest detail")


async def events_until_end(
    stub: pb_grpc.ImageGenerationStub,
    job_id: str,
    *,
    after_version: int = 0,
    timeout: float = 20.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[pb.JobEvent]:
    """Every event WatchJob sends until the stream ends (which it must, within `timeout`)."""
    events: list[pb.JobEvent] = []
    async with asyncio.timeout(timeout):
        async for event in stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id, after_version=after_version), metadata=metadata
        ):
            events.append(event)
    return events


async def finished(
    stub: pb_grpc.ImageGenerationStub,
    job_id: str,
    *,
    timeout: float = 20.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> pb.Job:
    """The job once it reached a terminal status."""
    events = await events_until_end(stub, job_id, timeout=timeout, metadata=metadata)
    job = events[-1].job
    assert job.status in TERMINAL, events
    return job


async def first_event_with_status(
    stream: grpc.aio.UnaryStreamCall,
    status: int,
    *,
    timeout: float = 10.0,  # type: ignore[type-arg]
) -> pb.JobEvent:
    """Read a watch stream until an event whose job has `status`."""
    async with asyncio.timeout(timeout):
        while True:
            event = await stream.read()
            assert event is not grpc.aio.EOF, "stream ended before the status was seen"
            if event.job.status == status:
                return event


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until `check()` is true, failing after `timeout` (a bounded poll, for states with no event)."""
    async with asyncio.timeout(timeout):
        while True:
            outcome = check()
            if not isinstance(outcome, bool):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(interval)


def full_spec() -> JobSpec:
    """A spec with every field set, and text that JSON must escape."""
    return JobSpec(
        prompt='a café at dusk, 夕暮れ "quoted" \\ back',
        provider="seedream_4",
        width=2048,
        height=1024,
        num_variants=2,
        folder_id="trips",
        negative_prompt="blur",
        seed=2**32 - 1,
        output_format="jpeg",
        reference_image_urls=("https://example.com/a.png", "https://example.com/b.png"),
        provider_options={"watermark": False, "size": 2, "ratio": 1.5},
        labels={"team": "ads", "app": "é"},
    )
