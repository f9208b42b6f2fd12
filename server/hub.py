"""The event hub: fans committed transitions out to watch streams, one database read per changed job.

Wake-ups come from the store in this process and, on PostgreSQL, from NOTIFY for every process. A
single dispatcher task drains them, reads the new event rows of each job somebody watches once,
and hands each event to the interested subscriptions. A periodic catch-up re-reads the versions of
watched jobs, so a lost notification delays an event by at most one poll interval and never loses it.
Subscriptions themselves enforce order: a WatchJob stream that sees a version gap reads the gap from
the store (see `server.servicer`). A stream that has had nothing to send for a heartbeat interval is
handed a heartbeat (None) by one sweep over all subscriptions, rather than each stream arming a timer
around every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from storage.errors import SchemaBehind, StorageError
from storage.models import JobEvent, JobNotice, JobStatus, utcnow
from storage.port import JobEvents

log = logging.getLogger(__name__)

#: how far back the catch-up looks beyond its previous run (covers transactions that commit late)
CATCH_UP_MARGIN = timedelta(seconds=10)
#: how many (job → version dispatched) entries the hub remembers
REMEMBERED_JOBS = 100_000
#: heartbeat sweeps per heartbeat interval: a quiet stream's heartbeat comes 1 to 1.25 intervals late
HEARTBEAT_SWEEPS = 4


class Closed:
    """Put on a subscription's queue when the hub shuts down or the subscriber fell too far behind."""

    def __init__(self, reason: str, *, overflow: bool = False) -> None:
        self.reason = reason
        self.overflow = overflow


@dataclass(eq=False)
class Subscription:
    """One watch stream's mailbox."""

    account_id: str
    job_id: uuid.UUID | None = None
    folder_id: str | None = None
    statuses: frozenset[JobStatus] = frozenset()
    max_queued: int = 0
    started: datetime = field(default_factory=utcnow)
    #: the newest version this stream has sent (WatchJob keeps it), so a catch-up can skip what it has
    seen_version: int = 0
    #: events, then a Closed that ends the stream; None is a heartbeat
    queue: asyncio.Queue[JobEvent | Closed | None] = field(default_factory=asyncio.Queue)
    _closed: bool = False
    #: when something was last queued (time.monotonic), or the subscription made
    _last_offered: float = field(default_factory=time.monotonic)

    def wants(self, event: JobEvent) -> bool:
        """Whether this event belongs on this stream."""
        job = event.job
        if job.account_id != self.account_id:
            return False
        if self.job_id is not None:
            return job.id == self.job_id
        if event.event_time < self.started:
            return False
        if self.folder_id is not None and job.spec.folder_id != self.folder_id:
            return False
        return not self.statuses or job.status in self.statuses

    def offer(self, item: JobEvent | Closed) -> None:
        """Queue an item, closing the stream instead when the subscriber is too far behind."""
        if self._closed:
            return
        if isinstance(item, Closed):
            self._closed = True
        elif self.max_queued and self.queue.qsize() >= self.max_queued:
            self._closed = True
            item = Closed("watcher fell too far behind; reconnect", overflow=True)
        self._last_offered = time.monotonic()
        self.queue.put_nowait(item)

    def heartbeat_if_quiet(self, quiet_since: float) -> None:
        """Queue a heartbeat if nothing was queued since `quiet_since` and nothing waits to be sent.

        A stream whose queue holds anything has something to send, so heartbeats never pile up behind a
        stream that is not being read.
        """
        if self._closed or self._last_offered > quiet_since or not self.queue.empty():
            return
        self._last_offered = time.monotonic()
        self.queue.put_nowait(None)


class EventHub:
    """Delivers job events to subscriptions; see the module docstring."""

    def __init__(
        self,
        store: JobEvents,
        *,
        poll_interval_s: float,
        heartbeat_s: float | None = None,
        on_notices: Callable[[Sequence[JobNotice]], None] | None = None,
    ) -> None:
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._heartbeat_s = heartbeat_s
        self._on_notices = on_notices
        self._by_job: dict[uuid.UUID, set[Subscription]] = defaultdict(set)
        self._by_account: dict[str, set[Subscription]] = defaultdict(set)
        self._dispatched: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._inbox: dict[uuid.UUID, JobNotice] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_catch_up = utcnow()
        self._catch_up_requested = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run the dispatcher, the periodic catch-up and, with `heartbeat_s`, the heartbeats."""
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="hub-dispatch"),
            asyncio.create_task(self._catch_up_loop(), name="hub-catch-up"),
        ]
        if self._heartbeat_s:
            beats = self._heartbeat_loop(self._heartbeat_s)
            self._tasks.append(asyncio.create_task(beats, name="hub-heartbeat"))

    async def close(self, reason: str = "server shutting down") -> None:
        """End every subscription (streams answer UNAVAILABLE) and stop."""
        for subscription in self._all_subscriptions():
            subscription.offer(Closed(reason))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @property
    def open_subscriptions(self) -> int:
        """How many watch streams are open."""
        return sum(1 for _ in self._all_subscriptions())

    # ------------------------------------------------------------ subscriptions

    @contextlib.contextmanager
    def subscribe(self, subscription: Subscription) -> Iterator[Subscription]:
        """Register a subscription for the duration of a `with` block; nothing is left behind after it."""
        index = self._by_job if subscription.job_id is not None else self._by_account
        key = subscription.job_id if subscription.job_id is not None else subscription.account_id
        index[key].add(subscription)  # type: ignore[index]
        try:
            yield subscription
        finally:
            members = index[key]  # type: ignore[index]
            members.discard(subscription)
            if not members:
                del index[key]  # type: ignore[arg-type]

    def wants_notices(self) -> bool:
        """Whether a notice can matter here now: a watch stream is open, or a worker is told of them.

        A subscription registers before it reads what it has missed, so a notice skipped while this was
        false concerned nobody. It spares an API process nobody watches the decoding of every replica's
        notices (3.4 µs per job).
        """
        return self._on_notices is not None or bool(self._by_job) or bool(self._by_account)

    # ------------------------------------------------------------ wake-ups

    def notify(self, notices: Sequence[JobNotice]) -> None:
        """Told of committed transitions (by the store in this process, or by NOTIFY); never blocks."""
        for notice in notices:
            if notice.job_id in self._by_job or notice.account_id in self._by_account:
                known = self._inbox.get(notice.job_id)
                if known is None or known.version < notice.version:
                    self._inbox[notice.job_id] = notice
        if self._inbox:
            self._wake.set()
        if self._on_notices is not None:
            self._on_notices(notices)  # the worker: new work to claim, or a job of its was cancelled

    def request_catch_up(self) -> None:
        """Re-read soon what may have been missed (after the NOTIFY connection came back)."""
        self._catch_up_requested = True
        self._wake.set()

    # ------------------------------------------------------------ internals

    def _all_subscriptions(self) -> Iterator[Subscription]:
        for members in list(self._by_job.values()) + list(self._by_account.values()):
            yield from list(members)

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._catch_up_requested:
                self._catch_up_requested = False
                await self._catch_up()
            inbox, self._inbox = self._inbox, {}
            if inbox:
                try:
                    await self._deliver(list(inbox.values()), from_catch_up=False)
                except StorageError as exc:
                    # the catch-up loop will find these again once the database answers
                    log.warning("event hub could not read events: %s", exc)
                except Exception:
                    # every watch stream depends on this loop: it must outlive any surprise
                    log.exception("event hub delivery failed; the catch-up will repair it")

    async def _catch_up_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            self._catch_up_requested = True
            self._wake.set()

    async def _heartbeat_loop(self, heartbeat_s: float) -> None:
        """Hand a heartbeat to every stream that has had nothing to send for `heartbeat_s`.

        One sweep serves every stream. A timer armed around each stream's wait (`asyncio.timeout`) cost
        5 µs per event per stream, timed alone: 5 ms of the 60-70 ms one event took to reach 1,000
        streams, 50 ms of the 1.1 s to reach 10,000.
        """
        while True:
            await asyncio.sleep(heartbeat_s / HEARTBEAT_SWEEPS)
            quiet_since = time.monotonic() - heartbeat_s
            for subscription in self._all_subscriptions():
                subscription.heartbeat_if_quiet(quiet_since)

    async def _catch_up(self) -> None:
        since = self._last_catch_up - CATCH_UP_MARGIN
        now = utcnow()
        try:
            notices = await self._store.versions(list(self._by_job))
            notices += await self._store.changed_since(list(self._by_account), since)
            await self._deliver(notices, from_catch_up=True)
        except StorageError as exc:
            if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                log.warning("event hub catch-up failed: %s", exc)
            return
        except Exception:
            log.exception("event hub catch-up failed unexpectedly")
            return
        self._last_catch_up = now

    async def _deliver(self, notices: Sequence[JobNotice], *, from_catch_up: bool) -> None:
        bases: dict[uuid.UUID, int] = {}
        for notice in notices:
            dispatched = self._dispatched.get(notice.job_id)
            if dispatched is not None and notice.version <= dispatched:
                continue
            if from_catch_up and self._all_current(notice):
                self._remember(notice.job_id, notice.version)  # every watcher has it: nothing to read
                continue
            if dispatched is not None:
                bases[notice.job_id] = dispatched
            elif notice.account_id in self._by_account:
                # First sight of a job that WatchJobs streams may want: its whole (short) history, each
                # stream keeping what happened after it started. These streams do not repair gaps, and
                # the notice may not be the job's first: notices coalesce in the inbox (a job created and
                # claimed between two dispatches), and a NOTIFY can be lost. WatchJob streams skip
                # versions they have sent.
                bases[notice.job_id] = 0
            elif notice.job_id in self._by_job or not from_catch_up:
                # First sight of a job only WatchJob streams watch: read just the version named. A stream
                # that is further behind reads its own gap, in order, from the store.
                bases[notice.job_id] = notice.version - 1
        if not bases:
            return
        # one read for every job that changed, however many streams watch them
        for job_id, events in (await self._store.events_after(bases)).items():
            for event in events:
                for subscription in self._interested(event):
                    subscription.offer(event)
            self._remember(job_id, events[-1].version)

    def _all_current(self, notice: JobNotice) -> bool:
        watchers = self._by_job.get(notice.job_id, ())
        return (
            bool(watchers)
            and notice.account_id not in self._by_account
            and all(watcher.seen_version >= notice.version for watcher in watchers)
        )

    def _interested(self, event: JobEvent) -> list[Subscription]:
        found = [s for s in self._by_job.get(event.job.id, ()) if s.wants(event)]
        found += [s for s in self._by_account.get(event.job.account_id, ()) if s.wants(event)]
        return found

    def _remember(self, job_id: uuid.UUID, version: int) -> None:
        self._dispatched[job_id] = version
        self._dispatched.move_to_end(job_id)
        while len(self._dispatched) > REMEMBERED_JOBS:
            self._dispatched.popitem(last=False)
