"""The account stream: every event numbered in commit order, so WatchJobs can resume with no gap.

A number taken at insert would not do on PostgreSQL: a transaction that took 41 may commit after one that
took 42, and a reader resuming after 42 would never see 41. So events are written without a sequence,
and the sequencer numbers the committed ones later, under the lock of the one `event_sequencer` row: a
run waits for the previous one to commit, and its next statement sees everything committed before it.
An event committed after a run is numbered by a later run, above every number given so far. Nothing is
numbered until somebody reads the stream (a WatchJobs stream or a webhook), so an unused stream costs
the hot path nothing beyond a small partial index.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, select, update

from storage.codec import event_from_row
from storage.connections import Connections
from storage.models import JobEvent
from storage.port import StreamHead
from storage.schema import event_sequencer, job_events

#: events numbered per sequencer transaction
SEQUENCE_BATCH = 5000
#: events examined per retention transaction
PRUNE_BATCH = 1000


class EventStream:
    """Numbering, reading and pruning the account stream (a part of `SqlJobStore`)."""

    _db: Connections

    async def sequence_events(self) -> int:
        """Number every committed event that has no sequence yet; the newest sequence given."""
        while True:
            async with self._db.connection() as conn:
                waiting = (
                    await conn.execute(
                        select(job_events.c.id).where(job_events.c.sequence.is_(None)).limit(1)
                    )
                ).first()
            if waiting is None:
                return (await self.stream_head()).last_sequence
            async with self._db.transaction() as conn:
                last = (
                    await conn.execute(
                        select(event_sequencer.c.last_sequence)
                        .where(event_sequencer.c.id == 1)
                        .with_for_update()
                    )
                ).scalar_one()
                # a new statement, so (READ COMMITTED) it sees every run that committed before the lock
                ids = (
                    (
                        await conn.execute(
                            select(job_events.c.id)
                            .where(job_events.c.sequence.is_(None))
                            .order_by(job_events.c.id)
                            .limit(SEQUENCE_BATCH)
                        )
                    )
                    .scalars()
                    .all()
                )
                if ids:
                    await conn.execute(
                        update(job_events)
                        .where(job_events.c.id == bindparam("b_id"))
                        .values(sequence=bindparam("b_sequence")),
                        [{"b_id": id_, "b_sequence": last + n} for n, id_ in enumerate(ids, start=1)],
                    )
                    await conn.execute(
                        update(event_sequencer)
                        .where(event_sequencer.c.id == 1)
                        .values(last_sequence=last + len(ids))
                    )
            if len(ids) < SEQUENCE_BATCH:
                return int(last) + len(ids)

    async def stream_head(self) -> StreamHead:
        """The stream's newest sequence and its retention horizon."""
        async with self._db.connection() as conn:
            row = (
                await conn.execute(
                    select(event_sequencer.c.last_sequence, event_sequencer.c.pruned_through).where(
                        event_sequencer.c.id == 1
                    )
                )
            ).one()
        return StreamHead(last_sequence=row.last_sequence, pruned_through=row.pruned_through)

    async def stream_events(
        self, account_id: str, *, after_sequence: int, limit: int = 500
    ) -> list[JobEvent]:
        """The account's numbered events after `after_sequence`, in order (at most `limit`)."""
        async with self._db.connection() as conn:
            rows = (
                await conn.execute(
                    select(job_events)
                    .where(job_events.c.account_id == account_id, job_events.c.sequence > after_sequence)
                    .order_by(job_events.c.sequence)
                    .limit(limit)
                )
            ).all()
        return [event_from_row(row) for row in rows]

    async def prune_events(self, before: datetime) -> int:
        """Drop events older than `before`, oldest first; how many. Resuming before them is then refused."""
        await self.sequence_events()  # what is dropped was numbered, so resuming before it is refused
        removed = 0
        while True:
            async with self._db.transaction() as conn:
                pruned_through = (
                    await conn.execute(
                        select(event_sequencer.c.pruned_through)
                        .where(event_sequencer.c.id == 1)
                        .with_for_update()
                    )
                ).scalar_one()
                oldest = (
                    await conn.execute(
                        select(job_events.c.id, job_events.c.sequence, job_events.c.event_time)
                        .order_by(job_events.c.id)
                        .limit(PRUNE_BATCH)
                    )
                ).all()
                old = [row for row in oldest if row.event_time < before]
                if not old:
                    return removed
                await conn.execute(delete(job_events).where(job_events.c.id.in_([row.id for row in old])))
                dropped = max((row.sequence or 0 for row in old), default=0)
                if dropped > pruned_through:
                    await conn.execute(
                        update(event_sequencer)
                        .where(event_sequencer.c.id == 1)
                        .values(pruned_through=dropped)
                    )
                removed += len(old)
            if len(old) < len(oldest) or len(oldest) < PRUNE_BATCH:
                return removed
