"""Random and mutated raw bytes to every method of the server: never UNKNOWN or INTERNAL, nothing written.

The bytes go to the wire as they are (no serializer), so the server's parsing is what is exercised:
corrupt wire format, invalid UTF-8, wrong field types, deep nesting, and messages that parse but say
nonsense. Bounded: a few hundred calls on one server, in well under 30 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from imagegen.v1 import imagegen_pb2 as pb
from server.app import running_app
from tests.conftest import authed_channel, test_settings

#: statuses that would mean the server did not know what to make of the input
_NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class Method:
    path: str
    kind: str  # unary, server_stream or bidi
    seed: bytes  # a valid request, for mutations to start from


def _options() -> struct_pb2.Struct:
    options = struct_pb2.Struct()
    options.update({"safety_tolerance": 2, "prompt_upsampling": True, "nested": {"a": [1, "b", None]}})
    return options


_JOB_ID = "0e0b6b4c-3d0a-4f7a-9e3b-2a4b6c8d0e1f"
METHODS = [
    Method(
        "/imagegen.v1.ImageGeneration/GenerateImage",
        "unary",
        pb.GenerateImageRequest(
            prompt="a cat on a mat",
            provider="flux_2_pro",
            width=512,
            height=768,
            num_variants=2,
            seed=7,
            folder_id="trips",
            labels={"team": "ads"},
            reference_image_urls=["https://example.com/a.png"],
            provider_options=_options(),
            request_id="fuzz-1",
        ).SerializeToString(),
    ),
    Method(
        "/imagegen.v1.ImageGeneration/GetJob", "unary", pb.GetJobRequest(job_id=_JOB_ID).SerializeToString()
    ),
    Method(
        "/imagegen.v1.ImageGeneration/CancelJob",
        "unary",
        pb.CancelJobRequest(job_id=_JOB_ID).SerializeToString(),
    ),
    Method(
        "/imagegen.v1.ImageGeneration/ListJobs",
        "unary",
        pb.ListJobsRequest(
            page_size=5,
            statuses=[pb.JOB_STATUS_PENDING],
            provider="flux_2_pro",
            folder_id="trips",
            page_token="eyJ0",
        ).SerializeToString(),
    ),
    Method(
        "/imagegen.v1.ImageGeneration/ListProviders", "unary", pb.ListProvidersRequest().SerializeToString()
    ),
    Method(
        "/imagegen.v1.ImageGeneration/WatchJob",
        "server_stream",
        pb.WatchJobRequest(job_id=_JOB_ID, after_version=3).SerializeToString(),
    ),
    Method(
        "/imagegen.v1.ImageGeneration/WatchJobs",
        "server_stream",
        pb.WatchJobsRequest(folder_id="trips", statuses=[pb.JOB_STATUS_FAILED]).SerializeToString(),
    ),
    Method(
        "/grpc.health.v1.Health/Check", "unary", health_pb2.HealthCheckRequest(service="").SerializeToString()
    ),
    *(
        Method(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            "bidi",
            reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
        )
        for version in ("v1", "v1alpha")
    ),
]


@st.composite
def payloads(draw: st.DrawFn) -> tuple[Method, bytes]:
    """A method and bytes for it: random, or its valid request with a few bytes flipped, inserted, cut."""
    method = draw(st.sampled_from(METHODS))
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=96))
    data = bytearray(method.seed)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if change == "flip" and where < len(data):
            data[where] ^= draw(st.integers(1, 255))
        elif change == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif change == "delete":
            del data[where : where + draw(st.integers(1, 8))]
        else:
            del data[where:]
    return method, bytes(data)


@dataclass
class Target:
    channel: grpc.aio.Channel
    database: asyncpg.Connection  # type: ignore[type-arg]


@pytest.fixture
async def target(tmp_path: Path, database_url: str) -> AsyncIterator[Target]:
    """A server with tokens, without workers, and a caller that may act for every account."""
    settings_ = test_settings(tmp_path, database_url, secured=True, role="api")
    database = await asyncpg.connect(make_url(database_url).render_as_string(hide_password=False))
    try:
        async with running_app(settings_) as app, authed_channel(app.grpc_target) as channel:
            yield Target(channel, database)
    finally:
        await database.close()


async def _rows(target: Target) -> tuple[int, int]:
    row = await target.database.fetchrow(
        "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM job_events) AS events"
    )
    assert row is not None
    return row["jobs"], row["events"]


async def _call(channel: grpc.aio.Channel, method: Method, data: bytes) -> grpc.StatusCode | None:
    """The status the call ended with; None for a stream still open after its first answer or a moment."""
    if method.kind == "unary":
        try:
            await channel.unary_unary(method.path)(data, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert "Traceback" not in (error.details() or "")
            return error.code()
        return grpc.StatusCode.OK
    if method.kind == "server_stream":
        call = channel.unary_stream(method.path)(data, timeout=10)
    else:
        call = channel.stream_stream(method.path)(iter([data]), timeout=10)
    try:
        async with asyncio.timeout(0.3):  # a valid watch stays open: its first answer, or this, is enough
            await call.read()
    except TimeoutError:
        pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    if not call.done():
        call.cancel()
        return None
    return await call.code()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads())
async def test_raw_bytes_never_reach_unknown_or_internal_and_write_nothing(
    target: Target, payload: tuple[Method, bytes]
) -> None:
    method, data = payload
    before = await _rows(target)
    code = await _call(target.channel, method, data)
    assert code not in _NEVER, (method.path, data.hex(), code)
    after = await _rows(target)
    if method.path.endswith("/GenerateImage") and code is grpc.StatusCode.OK:
        assert after in (before, (before[0] + 1, before[1] + 1))  # a valid request: one job, or its retry
    else:
        assert after == before, (method.path, data.hex(), code)
