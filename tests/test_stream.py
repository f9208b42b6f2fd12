"""The account stream: every event numbered in commit order, and WatchJobs resuming with after_sequence."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import running_app
from storage.db import make_engine
from storage.jobs import SqlJobStore
from storage.models import JobSpec, NewJob, utcnow
from tests.conftest import test_settings
from tests.helpers import bad_fields, eventually, status_details

TERMINAL = (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED)
SPEC = JobSpec(prompt="a lighthouse", provider="flux_2_pro", width=256, height=256, num_variants=1)


@pytest.fixture
def store(store_on_each_database: SqlJobStore) -> SqlJobStore:
    return store_on_each_database


async def test_events_are_numbered_in_order_and_read_per_account(store: SqlJobStore) -> None:
    start = await store.sequence_events()
    a, _ = await store.create(NewJob(account_id="a", spec=SPEC, estimated_cost_usd_micros=0))
    b, _ = await store.create(NewJob(account_id="b", spec=SPEC, estimated_cost_usd_micros=0))
    await store.cancel("a", a.id)
    assert await store.sequence_events() == start + 3
    events = await store.stream_events("a", after_sequence=start)
    assert [(e.job.id, e.version) for e in events] == [(a.id, 1), (a.id, 2)]
    assert events[0].sequence < events[1].sequence
    assert [e.job.id for e in await store.stream_events("b", after_sequence=start)] == [b.id]
    # numbering is idempotent: nothing new, nothing renumbered
    assert await store.sequence_events() == start + 3
    assert await store.stream_events("a", after_sequence=events[1].sequence) == []


async def test_retention_drops_old_events_and_records_the_horizon(store: SqlJobStore) -> None:
    job, _ = await store.create(NewJob(account_id="a", spec=SPEC, estimated_cost_usd_micros=0))
    await store.cancel("a", job.id)
    assert await store.prune_events(utcnow() - timedelta(hours=1)) == 0
    newest = await store.sequence_events()
    assert await store.prune_events(utcnow() + timedelta(seconds=1)) == 2
    head = await store.stream_head()
    assert head.pruned_through == newest
    assert await store.stream_events("a", after_sequence=0) == []


async def test_a_transaction_that_commits_late_is_numbered_after_what_committed_before_it(
    database_url: str,
) -> None:
    # The hazard: T1 inserts its event first (the smaller id) but commits after T2. A reader that had
    # taken ids as positions would have seen T2's event, moved past T1's id, and never seen T1's.
    engine = make_engine(database_url)
    store = SqlJobStore(engine)
    t1 = await asyncpg.connect(database_url)
    t2 = await asyncpg.connect(database_url)
    try:
        first, _ = await store.create(NewJob(account_id="acct", spec=SPEC, estimated_cost_usd_micros=0))
        second, _ = await store.create(NewJob(account_id="acct", spec=SPEC, estimated_cost_usd_micros=0))
        position = await store.sequence_events()
        insert = """INSERT INTO job_events (job_id, account_id, version, status, previous_status, message,
                        event_time, snapshot)
                    SELECT job_id, account_id, 2, 'pending', 'pending', 'late', event_time, snapshot
                    FROM job_events WHERE job_id = $1 AND version = 1 RETURNING id"""
        late = t1.transaction()
        await late.start()
        late_id = await t1.fetchval(insert, first.id)
        async with t2.transaction():
            early_id = await t2.fetchval(insert, second.id)
        assert late_id < early_id  # T1 inserted first and has not committed; T2 has

        seen = []
        await store.sequence_events()
        batch = await store.stream_events("acct", after_sequence=position)
        assert [(e.job.id, e.version) for e in batch] == [(second.id, 2)]
        seen += batch
        position = batch[-1].sequence

        await late.commit()
        await store.sequence_events()
        batch = await store.stream_events("acct", after_sequence=position)
        assert [(e.job.id, e.version) for e in batch] == [(first.id, 2)]  # not skipped
        seen += batch
        assert batch[0].sequence > position
        assert len({e.sequence for e in seen}) == 2
    finally:
        await t1.close()
        await t2.close()
        await store.close()
        await engine.dispose()


async def _events_until(
    stream: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    done: Callable[[list[pb.JobEvent]], bool],
    *,
    timeout: float = 30.0,
) -> list[pb.JobEvent]:
    events: list[pb.JobEvent] = []
    async with asyncio.timeout(timeout):
        while not done(events):
            event = await stream.read()
            assert isinstance(event, pb.JobEvent), "the stream ended early"
            if event.kind != pb.JOB_EVENT_KIND_HEARTBEAT:
                events.append(event)
    return events


async def test_watch_jobs_resumes_at_another_replica_with_every_event_exactly_once(
    tmp_path: Path, database_url: str
) -> None:
    fast: dict[str, Any] = {"sandbox_latency_s": 0.05}
    async with (
        running_app(test_settings(tmp_path / "a", database_url, **fast)) as a,
        running_app(test_settings(tmp_path / "b", database_url, **fast)) as b,
        grpc.aio.insecure_channel(a.grpc_target) as channel_a,
        grpc.aio.insecure_channel(b.grpc_target) as channel_b,
    ):
        stub_a, stub_b = (
            pb_grpc.ImageGenerationStub(channel_a),
            pb_grpc.ImageGenerationStub(channel_b),
        )
        stream = stub_a.WatchJobs(pb.WatchJobsRequest())
        await stream.initial_metadata()
        first = await stub_a.GenerateImage(pb.GenerateImageRequest(prompt="one", width=256, height=256))
        before = await _events_until(
            stream, lambda seen: any(e.job.id == first.id and e.job.status in TERMINAL for e in seen)
        )
        stream.cancel()  # the backend goes away

        # while it is gone: jobs submitted at the other replica run to their end, one is cancelled
        ids = [
            (await stub_b.GenerateImage(pb.GenerateImageRequest(prompt=prompt, width=256, height=256))).id
            for prompt in ("p1", "p2", "p3", "cancelled [sandbox:slow=5]")
        ]
        await stub_b.CancelJob(pb.CancelJobRequest(job_id=ids[-1]))
        finals: dict[str, int] = {}

        async def all_terminal() -> bool:
            for job_id in ids:
                job = await stub_b.GetJob(pb.GetJobRequest(job_id=job_id))
                if job.status not in TERMINAL:
                    return False
                finals[job_id] = job.version
            return True

        await eventually(all_terminal, timeout=30)
        expected = {(job_id, version) for job_id, final in finals.items() for version in range(1, final + 1)}

        resumed_stream = stub_b.WatchJobs(pb.WatchJobsRequest(after_sequence=before[-1].sequence))
        resumed = await _events_until(
            resumed_stream, lambda seen: {(e.job.id, e.version) for e in seen} >= expected
        )
        resumed_stream.cancel()

    assert all(event.sequence > 0 for event in before + resumed)
    sequences = [event.sequence for event in before + resumed]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)  # in order, no repeat
    pairs = [(event.job.id, event.version) for event in resumed]
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected  # no gap, no repeat
    assert {(e.job.id, e.version) for e in before}.isdisjoint(pairs)


async def test_resuming_before_the_retention_window_is_out_of_range_with_the_oldest_sequence(
    stub: pb_grpc.ImageGenerationAsyncStub, database_url: str
) -> None:
    job = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="x [sandbox:slow=5]", width=256, height=256)
    )
    await stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    store = SqlJobStore(make_engine(database_url))
    try:
        newest = await store.sequence_events()
        assert await store.prune_events(utcnow() + timedelta(seconds=1)) >= 2
    finally:
        await store.close()
        await store.engine.dispose()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchJobs(pb.WatchJobsRequest(after_sequence=newest - 1)):
            pass
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"the oldest available is {newest + 1}" in (caught.value.details() or "")
    info = error_details_pb2.ErrorInfo()
    assert status_details(caught.value).details[0].Unpack(info)
    assert info.metadata["oldest_sequence"] == str(newest + 1)

    for after in (-1, newest + 1000):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchJobs(pb.WatchJobsRequest(after_sequence=after)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "after_sequence" in bad_fields(caught.value)

    # resuming right at the horizon is fine: nothing after it was dropped
    stream = stub.WatchJobs(pb.WatchJobsRequest(after_sequence=newest))
    await stream.initial_metadata()
    stream.cancel()
