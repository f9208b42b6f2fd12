"""Each vendor's circuit breaker as a row that every replica reads and changes (`provider_breakers`).

closed → open when, within one window, at least `min_requests` requests were counted and the failed
share reached `failure_ratio`; open → half_open after `cooldown_s`, when the first of `probes` probe
slots is claimed; once every probe of the round answered, half_open → closed if all succeeded, → open
again (another cooldown) if any failed.
Every change happens under the row's lock (SELECT ... FOR UPDATE on PostgreSQL; SQLite serialises its
writers), so probe slots are given out exactly `probes` times across all replicas. A probe slot not
answered within a cooldown (its replica died) is given out again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.connections import Connections
from storage.schema import provider_breakers

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """The numbers of every breaker (settings IMAGEGEN_BREAKER_*)."""

    failure_ratio: float = 0.5
    min_requests: int = 10
    window_s: float = 60.0
    cooldown_s: float = 30.0
    probes: int = 1


@dataclass(frozen=True, kw_only=True)
class BreakerState:
    """One vendor's breaker as the database has it."""

    vendor: str
    state: str = CLOSED
    requests: int = 0
    failures: int = 0
    opened_at: datetime | None = None
    probe_at: datetime | None = None
    probes_claimed: int = 0

    @property
    def failure_ratio(self) -> float:
        """The failed share of the window's requests."""
        return self.failures / self.requests if self.requests else 0.0


class SqlBreakers:
    """The breakers' rows in PostgreSQL or SQLite."""

    def __init__(self, engine: AsyncEngine, policy: BreakerPolicy) -> None:
        self._db = Connections(engine)
        self.policy = policy

    async def states(self) -> dict[str, BreakerState]:
        """Every vendor's breaker that has a row (a vendor without one is closed)."""
        async with self._db.connection() as conn:
            rows = (await conn.execute(select(provider_breakers))).all()
        return {row.vendor: _state(row._mapping) for row in rows}

    async def report(self, counts: Mapping[str, tuple[int, int]], now: datetime) -> None:
        """Add {vendor: (requests, failures)} to the closed breakers' windows; open those past the threshold.

        Counts reported to an open or half-open breaker are of requests made before it opened: dropped.
        """
        policy = self.policy
        for vendor, (requests, failures) in sorted(counts.items()):
            async with self._db.transaction() as conn:
                row = await _locked(conn, vendor, now)
                if row["state"] != CLOSED:
                    continue
                if row["window_start"] + timedelta(seconds=policy.window_s) <= now:
                    values: dict[str, Any] = {"window_start": now, "requests": 0, "failures": 0}
                else:
                    values = {"requests": row["requests"], "failures": row["failures"]}
                values["requests"] += requests
                values["failures"] += failures
                if (
                    values["requests"] >= policy.min_requests
                    and values["failures"] >= policy.failure_ratio * values["requests"]
                    and values["failures"] > 0
                ):
                    values.update(self._opened(now))
                await _write(conn, vendor, values, now)

    async def claim_probe(self, vendor: str, now: datetime) -> bool:
        """Whether this caller may send one probe request to the vendor now (taking a slot if so)."""
        async with self._db.transaction() as conn:
            row = await _locked(conn, vendor, now)
            state, probe_at = row["state"], row["probe_at"]
            if state == CLOSED:
                return True
            due = probe_at is None or probe_at <= now
            if not due:
                if state == OPEN or row["probes_claimed"] >= self.policy.probes:
                    return False
                await _write(conn, vendor, {"probes_claimed": row["probes_claimed"] + 1}, now)
                return True
            if state == HALF_OPEN and row["probes_failed"]:
                # a round that was not fully answered in time, with a failure: open again
                await _write(conn, vendor, self._opened(now), now)
                return False
            if state == HALF_OPEN and row["probes_succeeded"]:
                await _write(conn, vendor, _closed(now), now)
                return True
            # the cooldown has passed, or a round's probes all went unanswered: a new round of probes
            values = {
                "state": HALF_OPEN,
                "probes_claimed": 1,
                "probes_succeeded": 0,
                "probes_failed": 0,
                "probe_at": now + timedelta(seconds=self.policy.cooldown_s),
            }
            await _write(conn, vendor, values, now)
            return True

    async def probe_result(self, vendor: str, ok: bool, now: datetime) -> None:
        """A probe's outcome. Once every probe of the round has answered: all well closes the breaker, any
        failure opens it again for another cooldown."""
        async with self._db.transaction() as conn:
            row = await _locked(conn, vendor, now)
            if row["state"] != HALF_OPEN:
                return
            succeeded = row["probes_succeeded"] + ok
            failed = row["probes_failed"] + (not ok)
            if succeeded + failed < self.policy.probes:
                await _write(conn, vendor, {"probes_succeeded": succeeded, "probes_failed": failed}, now)
            elif failed:
                await _write(conn, vendor, self._opened(now), now)
            else:
                await _write(conn, vendor, _closed(now), now)

    def _opened(self, now: datetime) -> dict[str, Any]:
        return {
            "state": OPEN,
            "opened_at": now,
            "probe_at": now + timedelta(seconds=self.policy.cooldown_s),
            "probes_claimed": 0,
            "probes_succeeded": 0,
            "probes_failed": 0,
        }


def _closed(now: datetime) -> dict[str, Any]:
    return {
        "state": CLOSED,
        "window_start": now,
        "requests": 0,
        "failures": 0,
        "opened_at": None,
        "probe_at": None,
        "probes_claimed": 0,
        "probes_succeeded": 0,
        "probes_failed": 0,
    }


async def _locked(conn: AsyncConnection, vendor: str, now: datetime) -> RowMapping:
    """The vendor's row, locked for this transaction; created closed if it has none."""
    query = select(provider_breakers).where(provider_breakers.c.vendor == vendor).with_for_update()
    row = (await conn.execute(query)).first()
    if row is None:
        # two replicas may both find no row: one inserts it, the other's insert does nothing
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        await conn.execute(
            dialect_insert(provider_breakers)
            .values(vendor=vendor, window_start=now, update_time=now)
            .on_conflict_do_nothing(index_elements=[provider_breakers.c.vendor])
        )
        row = (await conn.execute(query)).one()
    return row._mapping


async def _write(conn: AsyncConnection, vendor: str, values: Mapping[str, Any], now: datetime) -> None:
    await conn.execute(
        update(provider_breakers)
        .where(provider_breakers.c.vendor == vendor)
        .values(**values, update_time=now)
    )


def _state(m: RowMapping) -> BreakerState:
    return BreakerState(
        vendor=m["vendor"],
        state=m["state"],
        requests=m["requests"],
        failures=m["failures"],
        opened_at=m["opened_at"],
        probe_at=m["probe_at"],
        probes_claimed=m["probes_claimed"],
    )
