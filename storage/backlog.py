"""The work a worker could start now, as one PostgreSQL statement: what the worker autoscaler polls.

A pending job is *claimable* when it is due and a claim would take it: its vendor's cap
(IMAGEGEN_VENDOR_CONCURRENCY) has room for it after the older due jobs of that vendor, and its account is
under IMAGEGEN_MAX_IN_FLIGHT_PER_ACCOUNT. The rules mirror the claim's (`claimable` in
storage/dialects.py): a capped vendor's due
jobs are taken oldest first while their tasks (variants) fit in the room the processing ones leave, a
job too big to ever fit runs alone once nothing of its vendor runs, a full account's jobs wait, and a
partly full account gets its oldest jobs up to its limit. Jobs held back by a cap are not work more
workers could do, so they are not counted.

KEDA runs the statement as text (it cannot take parameters), so the caps are written into it as
literals; `python -m server backlog --sql` prints it for the settings it is run with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.port import ConcurrencyCap

#: what may be written into the statement as a literal (model ids and vendor names are like this)
_SAFE_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class Backlog:
    #: pending jobs a claim would take now
    claimable: int
    #: jobs processing (each holds a worker's slot until it ends, or its lease expires and it is taken over)
    processing: int

    @property
    def demand(self) -> int:
        """Worker slots wanted now: what runs plus what could start (what the autoscaler divides)."""
        return self.claimable + self.processing


def _literal(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ValueError(f"{name!r} cannot be written into the backlog statement")
    return f"'{name}'"


def _cap_of(caps: Sequence[ConcurrencyCap]) -> str:
    """A SQL expression naming the cap the model a job runs on now falls under (NULL: uncapped)."""
    if not caps:
        return "NULL::text"
    whens = " ".join(
        f"WHEN active_provider IN ({', '.join(_literal(p) for p in sorted(cap.providers))}) "
        f"THEN {_literal(cap.name)}"
        for cap in caps
        if cap.providers
    )
    return f"CASE {whens} END" if whens else "NULL::text"


def claimable_sql(
    caps: Sequence[ConcurrencyCap] = (), *, per_account: int = 0, with_processing: bool = False
) -> str:
    """One statement answering one integer: claimable jobs (plus processing ones with `with_processing`)."""
    if any(cap.max_tasks < 1 for cap in caps) or per_account < 0:
        raise ValueError("caps are at least 1 task; per_account is 0 (none) or more")
    cap_of = _cap_of(caps)
    full_accounts = (
        f"""
      AND account_id NOT IN (
        SELECT account_id FROM jobs WHERE status = 'processing'
        GROUP BY account_id HAVING count(*) >= {int(per_account)})"""
        if per_account
        else ""
    )
    limits = (
        "VALUES " + ", ".join(f"({_literal(cap.name)}, {int(cap.max_tasks)})" for cap in caps)
        if caps
        else "SELECT NULL::text, 0 WHERE false"
    )
    if per_account:
        # a partly full account gets its oldest jobs up to its limit, as the claim's last pass does
        counted = f"""(
    SELECT count(*) FROM (
      SELECT startable.account_id,
             row_number() OVER (PARTITION BY startable.account_id ORDER BY next_attempt_at, id) AS nth
      FROM startable) AS ranked
    LEFT JOIN (SELECT account_id, count(*) AS running FROM jobs
               WHERE status = 'processing' GROUP BY account_id) AS busy USING (account_id)
    WHERE coalesce(busy.running, 0) + ranked.nth <= {int(per_account)})"""
    else:
        counted = "(SELECT count(*) FROM startable)"
    processing = " + (SELECT count(*) FROM jobs WHERE status = 'processing')" if with_processing else ""
    return f"""WITH due AS (
    SELECT id, account_id, num_variants, next_attempt_at, {cap_of} AS cap
    FROM jobs
    WHERE status = 'pending' AND next_attempt_at <= now(){full_accounts}
  ),
  limits (cap, max_tasks) AS ({limits}),
  in_use AS (
    SELECT {cap_of} AS cap, sum(num_variants) AS tasks
    FROM jobs WHERE status = 'processing' GROUP BY 1
  ),
  queued AS (
    SELECT due.*,
           sum(num_variants) OVER oldest_first AS tasks_so_far,
           row_number() OVER oldest_first AS place
    FROM due
    WINDOW oldest_first AS (PARTITION BY cap ORDER BY next_attempt_at, id)
  ),
  startable AS (
    SELECT queued.*
    FROM queued
    LEFT JOIN limits USING (cap)
    LEFT JOIN in_use USING (cap)
    WHERE limits.cap IS NULL
       OR queued.tasks_so_far <= limits.max_tasks - coalesce(in_use.tasks, 0)
       OR (queued.place = 1 AND coalesce(in_use.tasks, 0) = 0)
  )
SELECT {counted}{processing}"""


async def backlog(
    engine: AsyncEngine, caps: Sequence[ConcurrencyCap] = (), *, per_account: int = 0
) -> Backlog:
    """The claimable and processing jobs of the database behind `engine` (PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        raise ValueError("the backlog is counted on PostgreSQL (the store replicas and the autoscaler share)")
    async with engine.connect() as conn:
        claimable = (await conn.execute(text(claimable_sql(caps, per_account=per_account)))).scalar_one()
        processing = (
            await conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'processing'"))
        ).scalar_one()
    return Backlog(claimable=int(claimable), processing=int(processing))
