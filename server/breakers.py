"""Vendor circuit breakers as each replica sees them: a copy of the shared rows, refreshed on an interval.

Deciding whether a job may call its vendor reads this copy, so a closed breaker costs a dict lookup, not
a query. Outcomes are counted in memory and added to the shared window at each refresh; only probes
(while a breaker is half-open) go to the database at once, to claim their slot and report their result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from providers.base import ProviderError, RetryReason
from server.metrics import ServiceMetrics
from storage.breakers import CLOSED, HALF_OPEN, OPEN, BreakerState, SqlBreakers
from storage.errors import SchemaBehind, StorageError
from storage.models import utcnow

log = logging.getLogger(__name__)

#: the gauge's value of each state
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass(frozen=True)
class Admission:
    """Whether a job may call its vendor now."""

    #: None: go ahead; else the vendor's breaker is open and the job should not call before this time
    wait_until: datetime | None = None
    #: the call is one of the half-open breaker's probes: its outcome is reported at once
    probe: bool = False


GO = Admission()


def counts_against_vendor(exc: ProviderError) -> bool:
    """Whether a failure says the vendor is sick: transient ones, except throttling (our own quota)."""
    return exc.retryable and exc.reason is not RetryReason.RATE_LIMITED


class Breakers:
    """This replica's view of every vendor's breaker."""

    def __init__(
        self, book: SqlBreakers, vendors: Iterable[str], metrics: ServiceMetrics, *, refresh_s: float
    ) -> None:
        self._book = book
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._states = {vendor: BreakerState(vendor=vendor) for vendor in vendors}
        #: vendor -> [requests, failures] since the last report
        self._counts: dict[str, list[int]] = {}
        # SQLite has one writer: this process's breaker writes take turns rather than fail on a lock
        self._lock = asyncio.Lock()
        for vendor in self._states:
            metrics.breaker_state.labels(vendor).set(0)

    @property
    def policy_probes(self) -> int:
        """How many probe requests a half-open breaker lets through."""
        return self._book.policy.probes

    def state(self, vendor: str) -> BreakerState:
        """The vendor's breaker as last read."""
        return self._states.get(vendor) or BreakerState(vendor=vendor)

    def is_open(self, vendor: str) -> bool:
        """Whether the vendor's breaker is not closed (as last read)."""
        return self.state(vendor).state != CLOSED

    async def admit(self, vendor: str) -> Admission:
        """May a job call the vendor now? Closed: yes. Open: not before the cooldown ends. After it, only
        the callers that claim one of the probe slots, shared by every replica."""
        state = self.state(vendor)
        if state.state == CLOSED:
            return GO
        now = utcnow()
        if state.state == OPEN and state.probe_at is not None and now < state.probe_at:
            return Admission(wait_until=state.probe_at)
        async with self._lock:
            probing = await self._book.claim_probe(vendor, now)
        if probing:
            return Admission(probe=True)
        # the slots are taken: wait for their verdict, which the next refreshes bring
        return Admission(wait_until=now + timedelta(seconds=max(self._refresh_s * 2, 0.5)))

    async def record(self, vendor: str, admission: Admission, failed: bool) -> None:
        """An outcome of a call to the vendor: counted for the window, or (a probe's) reported now."""
        if admission.probe:
            try:
                async with self._lock:
                    await self._book.probe_result(vendor, not failed, utcnow())
                await self.refresh()
            except StorageError as exc:
                log.warning(
                    "could not report a probe of %s (%s); its slot frees after a cooldown", vendor, exc
                )
            return
        counts = self._counts.setdefault(vendor, [0, 0])
        counts[0] += 1
        counts[1] += failed

    async def refresh(self) -> None:
        """Add this replica's counts to the shared windows, then read every breaker."""
        counts, self._counts = self._counts, {}
        async with self._lock:
            if counts:
                await self._book.report({vendor: (c[0], c[1]) for vendor, c in counts.items()}, utcnow())
            states = await self._book.states()
        for vendor, state in states.items():
            before = self._states.get(vendor)
            self._states[vendor] = state
            self._metrics.breaker_state.labels(vendor).set(STATE_VALUES.get(state.state, 0))
            if before is not None and before.state != state.state:
                log.warning(
                    "circuit breaker of %s is %s (%d of %d requests failed)",
                    vendor,
                    state.state,
                    state.failures,
                    state.requests,
                    extra={"vendor": vendor, "breaker": state.state},
                )

    async def run(self) -> None:
        """Refresh every `refresh_s` until cancelled."""
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except StorageError as exc:
                if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                    log.warning("could not refresh the circuit breakers (%s); keeping the last state", exc)
            except Exception:
                log.exception("refreshing the circuit breakers failed unexpectedly")
