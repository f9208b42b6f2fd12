"""ImagegenClient: a typed asyncio client of imagegen.v1 with deadlines, retries and resumable watches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeVar

import aiohttp
import grpc
from google.protobuf import struct_pb2

from client._download import save_images as _save_images
from client._errors import ImagegenError, Unavailable, from_rpc_error
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

__version__ = "0.1.0"

OutputFormatName = Literal["png", "jpeg", "webp"]
"""The output formats by the names the command line and the catalog use."""

OUTPUT_FORMATS: Final[Mapping[str, pb.OutputFormat.ValueType]] = MappingProxyType(
    {
        "png": pb.OUTPUT_FORMAT_PNG,
        "jpeg": pb.OUTPUT_FORMAT_JPEG,
        "webp": pb.OUTPUT_FORMAT_WEBP,
    }
)
TERMINAL_STATUSES: Final[frozenset[pb.JobStatus.ValueType]] = frozenset(
    {pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED}
)
ACCOUNT_HEADER: Final = "x-account-id"

# Server-streaming watches are reads, so resuming them is always safe: a stream the server cancelled
# (CANCELLED, e.g. shut down past its grace period) is resumed like one it ended with UNAVAILABLE.
_RESUMABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def job_status(value: pb.JobStatus.ValueType | str) -> pb.JobStatus.ValueType:
    """A JobStatus from its enum value or a name such as "failed" or "JOB_STATUS_FAILED"."""
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("JOB_STATUS_") else f"JOB_STATUS_{name}"
        try:
            return pb.JobStatus.Value(name)
        except ValueError:
            raise ValueError(f"unknown job status {value!r}") from None
    return value


def status_name(value: pb.JobStatus.ValueType) -> str:
    """ "completed" for JOB_STATUS_COMPLETED, and so on."""
    return pb.JobStatus.Name(value).removeprefix("JOB_STATUS_").lower()


def is_terminal(job: pb.Job) -> bool:
    """Whether the job has reached COMPLETED, FAILED or CANCELLED."""
    return job.status in TERMINAL_STATUSES


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How the client retries UNAVAILABLE unary calls and reconnects dropped watch streams."""

    #: attempts of one unary call (the first included), and reconnects of a watch that never got through
    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    #: each pause is the exponential value times a random factor in [1 - jitter, 1 + jitter]
    jitter: float = 0.2
    #: how long a watch that was connected keeps reconnecting before it gives up (a restart takes a while)
    reconnect_for_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("need multiplier >= 1 and 0 <= jitter < 1")

    def delay(self, retry: int, rng: random.Random, *, at_least: float | None = None) -> float:
        """The pause before retry number `retry` (1-based); never shorter than the server's RetryInfo."""
        pause = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        pause *= 1 + self.jitter * (2 * rng.random() - 1)
        return max(pause, at_least or 0.0)


class ImagegenClient:
    """A client of the imagegen service; every method is a coroutine or an async iterator."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: str | None = None,
        account: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        stream_idle_timeout_s: float = 60.0,
        owns_channel: bool = False,
    ) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = pb_grpc.ImageGenerationStub(channel)
        metadata: list[tuple[str, str]] = []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        if account:
            metadata.append((ACCOUNT_HEADER, account))
        self._metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._idle_timeout_s = stream_idle_timeout_s
        self._rng = random.Random()

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        token: str | None = None,
        account: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        stream_idle_timeout_s: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> ImagegenClient:
        """A client with its own channel to `target` ("host:port"); TLS when `credentials` are given.

        `timeout_s` is the deadline of each unary call, retries included. `stream_idle_timeout_s` is how
        long a watch stream may stay silent (the server sends heartbeats while idle) before it is redialled.
        """
        policy = retry or RetryPolicy()
        options: list[tuple[str, Any]] = [
            ("grpc.primary_user_agent", f"imagegen-client/{__version__}"),
            # The channel's own reconnect backoff (default 1 s growing to 120 s) would keep a restarted
            # server unreachable long after it is back; follow the client's policy instead.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(policy.initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(policy.max_backoff_s * 1000))),
        ]
        if credentials is not None:
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        return cls(
            channel,
            token=token,
            account=account,
            timeout_s=timeout_s,
            retry=policy,
            stream_idle_timeout_s=stream_idle_timeout_s,
            owns_channel=True,
        )

    async def __aenter__(self) -> ImagegenClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    # ------------------------------------------------------------ unary calls

    async def generate(
        self,
        prompt: str,
        *,
        provider: str = "",
        width: int = 0,
        height: int = 0,
        num_variants: int = 0,
        folder_id: str = "",
        negative_prompt: str = "",
        seed: int | None = None,
        output_format: OutputFormatName | None = None,
        reference_image_urls: Sequence[str] = (),
        provider_options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        fallback_providers: Sequence[str] = (),
        fallback_on_moderation: bool = False,
        request_id: str | None = None,
        validate_only: bool = False,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
    ) -> pb.Job:
        """Submit a job and return it (PENDING); with `validate_only`, the normalised request and its quote.

        Zero / empty values take the server's defaults. `ttl_s`: delete the job (and its images) that
        many seconds after its creation (`Job.expire_time`); unset, the server's retention applies.
        A `request_id` (uuid4) is generated when none is given, so the client's own retries of this
        call can never create a second job.
        """
        request = pb.GenerateImageRequest(
            prompt=prompt,
            provider=provider,
            width=width,
            height=height,
            num_variants=num_variants,
            folder_id=folder_id,
            negative_prompt=negative_prompt,
            reference_image_urls=list(reference_image_urls),
            labels=dict(labels or {}),
            fallback_providers=list(fallback_providers),
            fallback_on_moderation=fallback_on_moderation,
            validate_only=validate_only,
        )
        if seed is not None:
            request.seed = seed
        if output_format is not None:
            if output_format not in OUTPUT_FORMATS:
                known = ", ".join(OUTPUT_FORMATS)
                raise ValueError(f"output_format must be one of {known}, not {output_format!r}")
            request.output_format = OUTPUT_FORMATS[output_format]
        if provider_options:
            options = struct_pb2.Struct()
            options.update(dict(provider_options))
            request.provider_options.CopyFrom(options)
        if ttl_s is not None:
            request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        if request_id:
            request.request_id = request_id
        elif not validate_only:
            request.request_id = str(uuid.uuid4())
        return await self._unary(self._stub.GenerateImage, request, timeout_s)

    async def get(self, job_id: str, *, timeout_s: float | None = None) -> pb.Job:
        """The job as it is now (image URLs freshly signed)."""
        return await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout_s)

    async def cancel(self, job_id: str, *, timeout_s: float | None = None) -> pb.Job:
        """Cancel a job (idempotent); FailedPrecondition when it already completed or failed."""
        return await self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout_s)

    async def delete(self, job_id: str, *, timeout_s: float | None = None) -> None:
        """Delete a finished job and its images; FailedPrecondition while it runs, NotFound afterwards."""
        await self._unary(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id), timeout_s)

    async def providers(self, *, timeout_s: float | None = None) -> Sequence[pb.Provider]:
        """The model catalog: limits, options, prices, and whether each model is configured."""
        response = await self._unary(self._stub.ListProviders, pb.ListProvidersRequest(), timeout_s)
        return tuple(response.providers)

    async def pages(
        self,
        *,
        statuses: Iterable[pb.JobStatus.ValueType | str] = (),
        provider: str = "",
        folder_id: str = "",
        page_size: int = 50,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[pb.ListJobsResponse, None]:
        """The caller's jobs, newest first, one ListJobsResponse page at a time (fetched lazily)."""
        request = pb.ListJobsRequest(
            page_size=page_size,
            statuses=[job_status(status) for status in statuses],
            provider=provider,
            folder_id=folder_id,
        )
        while True:
            page = await self._unary(self._stub.ListJobs, request, timeout_s)
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def list(
        self,
        *,
        statuses: Iterable[pb.JobStatus.ValueType | str] = (),
        provider: str = "",
        folder_id: str = "",
        page_size: int = 50,
        limit: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[pb.Job]:
        """The caller's jobs, newest first, across pages; at most `limit` when given."""
        if limit is not None and limit <= 0:
            return
        seen = 0
        size = page_size if limit is None else min(page_size, limit)
        async with contextlib.aclosing(
            self.pages(
                statuses=statuses, provider=provider, folder_id=folder_id, page_size=size, timeout_s=timeout_s
            )
        ) as pages:
            async for page in pages:
                for job in page.jobs:
                    yield job
                    seen += 1
                    if limit is not None and seen >= limit:
                        return

    # ------------------------------------------------------------ streams

    async def watch(
        self, job_id: str, *, after_version: int = 0, include_heartbeats: bool = False
    ) -> AsyncGenerator[pb.JobEvent, None]:
        """The job's events in version order until it reaches a terminal status, surviving dropped streams.

        With `after_version=0` the first event is a SNAPSHOT of the job; with N > 0 the events after
        version N. When the stream breaks (UNAVAILABLE, as on a server restart, or silence longer than
        the idle timeout) the client redials with backoff and resumes after the last version it yielded,
        so the caller sees neither a gap nor a repeat. HEARTBEAT events are skipped unless asked for.
        """
        loop = asyncio.get_running_loop()
        last = after_version
        connected_once = False
        failures = 0
        outage_since: float | None = None
        while True:
            call = self._stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id, after_version=last), metadata=self._metadata
            )
            broken: ImagegenError
            try:
                while True:
                    try:
                        async with asyncio.timeout(self._idle_timeout_s):
                            message = await call.read()
                    except TimeoutError:
                        broken = Unavailable(f"the watch stream was silent for {self._idle_timeout_s:g} s")
                        break
                    if message is grpc.aio.EOF:
                        return
                    assert isinstance(message, pb.JobEvent)
                    connected_once, failures, outage_since = True, 0, None
                    if message.kind == pb.JOB_EVENT_KIND_HEARTBEAT:
                        if include_heartbeats:
                            yield message
                        continue
                    if message.version <= last:
                        continue  # already yielded before the stream was resumed
                    last = message.version
                    yield message
                    if message.job.status in TERMINAL_STATUSES:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE:
                    raise from_rpc_error(exc) from exc
                broken = from_rpc_error(exc)
            finally:
                call.cancel()
            failures += 1
            outage_since = loop.time() if outage_since is None else outage_since
            gave_up = (
                loop.time() - outage_since >= self._retry.reconnect_for_s
                if connected_once
                else failures >= self._retry.max_attempts
            )
            if gave_up:
                raise broken
            await asyncio.sleep(self._retry.delay(failures, self._rng, at_least=broken.retry_after))

    async def wait(self, job_id: str, timeout: float | None = None) -> pb.Job:
        """The job once it is COMPLETED, FAILED or CANCELLED; TimeoutError after `timeout` seconds."""
        last: pb.Job | None = None
        async with asyncio.timeout(timeout):
            async with contextlib.aclosing(self.watch(job_id)) as events:
                async for event in events:
                    last = event.job
            if last is None or last.status not in TERMINAL_STATUSES:
                last = await self.get(job_id)  # the stream ended early; the job row is the truth
        return last

    async def save_images(
        self, job: pb.Job, out_dir: str | os.PathLike[str], *, session: aiohttp.ClientSession | None = None
    ) -> Sequence[Path]:
        """Download a completed job's images into `out_dir` as `<job_id>-<n>.<ext>` (n from 1), each verified.

        Sizes and SHA-256 digests are checked against the job's record; expired URLs are re-signed with
        `get`. Pass `session` to reuse one aiohttp session across many jobs.
        """
        if job.status != pb.JOB_STATUS_COMPLETED:
            raise ValueError(f"job {job.id} is {status_name(job.status)}: only completed jobs have images")
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            paths = await _save_images(
                job,
                Path(out_dir),
                session=session,
                refresh=lambda: self.get(job.id),
                timeout_s=self._timeout_s,
            )
        return tuple(paths)

    # ------------------------------------------------------------ plumbing

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, timeout_s: float | None
    ) -> _Resp:
        """One call under one deadline (retries included), retrying UNAVAILABLE with backoff."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
        attempt = 1
        while True:
            try:
                response: _Resp = await method(
                    request, timeout=max(deadline - loop.time(), 0.001), metadata=self._metadata
                )
                return response
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or attempt >= self._retry.max_attempts:
                    raise error from exc
                pause = self._retry.delay(attempt, self._rng, at_least=error.retry_after)
                if loop.time() + pause >= deadline:
                    raise error from exc
            await asyncio.sleep(pause)
            attempt += 1
