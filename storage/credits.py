"""Credits: account budgets, their ledger, and the reservations jobs hold against them.

A job of a budgeted account reserves its quote in the transaction that creates it, and settles it in
the transaction that ends it (the cost if it completed, nothing otherwise). An account without a budget
is unlimited. Every change to a balance writes a ledger row with the balance after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.connections import Connections
from storage.errors import InsufficientCredit, NoBudget
from storage.models import Job, JobStatus, LedgerEntry, utcnow
from storage.schema import accounts, ledger


class Budgets:
    """Operators' budget commands and the ledger (a part of `SqlJobStore`)."""

    _db: Connections

    async def set_budget(self, account_id: str, balance_usd_micros: int, *, note: str = "") -> int:
        """Give the account a budget of exactly this balance (creating it); returns the balance."""
        return await self._change_budget(account_id, "set", balance_usd_micros, note)

    async def add_credit(self, account_id: str, amount_usd_micros: int, *, note: str = "") -> int:
        """Add (or, negative, take) credit; the account must have a budget. Returns the balance."""
        return await self._change_budget(account_id, "add", amount_usd_micros, note)

    async def budget(self, account_id: str) -> int | None:
        """The account's balance, or None when it has no budget (unlimited)."""
        async with self._db.connection() as conn:
            balance: int | None = (
                await conn.execute(
                    select(accounts.c.balance_usd_micros).where(accounts.c.account_id == account_id)
                )
            ).scalar_one_or_none()
            return balance

    async def remove_budget(self, account_id: str) -> bool:
        """Make the account unlimited again; False when it had no budget. Its ledger is kept."""
        async with self._db.transaction() as conn:
            result = await conn.execute(accounts.delete().where(accounts.c.account_id == account_id))
        return result.rowcount == 1

    async def ledger_entries(self, account_id: str, *, limit: int = 50) -> list[LedgerEntry]:
        """The account's most recent ledger entries, newest first."""
        async with self._db.connection() as conn:
            rows = (
                await conn.execute(
                    select(ledger)
                    .where(ledger.c.account_id == account_id)
                    .order_by(ledger.c.id.desc())
                    .limit(limit)
                )
            ).all()
        return [LedgerEntry(**row._mapping) for row in rows]

    async def _change_budget(self, account_id: str, kind: str, amount: int, note: str) -> int:
        now = utcnow()
        async with self._db.transaction() as conn:
            current = (
                await conn.execute(
                    select(accounts.c.balance_usd_micros)
                    .where(accounts.c.account_id == account_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if kind == "set":
                balance, delta = amount, amount - (current or 0)
            elif current is None:
                raise NoBudget(account_id)
            else:
                balance, delta = current + amount, amount
            if current is None:
                await conn.execute(
                    insert(accounts).values(
                        account_id=account_id, balance_usd_micros=balance, create_time=now, update_time=now
                    )
                )
            else:
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.account_id == account_id)
                    .values(balance_usd_micros=balance, update_time=now)
                )
            await conn.execute(
                insert(ledger).values(
                    account_id=account_id,
                    job_id=None,
                    kind=kind,
                    amount_usd_micros=delta,
                    balance_usd_micros=balance,
                    time=now,
                    note=note,
                )
            )
        return balance


def budgeted_accounts(new_jobs: Sequence[Job]) -> list[str]:
    """The accounts among these jobs' whose quotes a budget might have to cover, in a stable order."""
    return sorted({job.account_id for job in new_jobs if job.estimated_cost_usd_micros > 0})


class Reservations:
    """The credit one transaction's creates reserve: planned before the insert, written after it."""

    @classmethod
    async def lock(cls, conn: AsyncConnection, new_jobs: Sequence[Job]) -> Reservations:
        """Lock the balances of the budgeted accounts among these jobs' (in a stable order)."""
        account_ids = budgeted_accounts(new_jobs)
        budgets: dict[str, int] = {}
        if account_ids:
            rows = await conn.execute(
                select(accounts.c.account_id, accounts.c.balance_usd_micros)
                .where(accounts.c.account_id.in_(account_ids))
                .order_by(accounts.c.account_id)
                .with_for_update()
            )
            budgets = {row.account_id: row.balance_usd_micros for row in rows}
        return cls(budgets)

    def __init__(self, budgets: dict[str, int]) -> None:
        self._budgets = budgets
        self._spent: dict[str, int] = {}
        self._ledger_rows: list[dict[str, Any]] = []

    def reserve(self, job: Job) -> Job:
        """The job holding its quote, if its account has a budget; InsufficientCredit if it cannot."""
        quote, balance = job.estimated_cost_usd_micros, self._budgets.get(job.account_id)
        if balance is None or quote <= 0:
            return job
        left = balance - self._spent.get(job.account_id, 0)
        if left < quote:
            raise InsufficientCredit(job.account_id, left, quote)
        self._spent[job.account_id] = self._spent.get(job.account_id, 0) + quote
        return job.evolve(reserved_usd_micros=quote)

    def created(self, job: Job, inserted: bool) -> None:
        """Whether a job that reserved was inserted: a ledger row if so, its credit back if not."""
        if not job.reserved_usd_micros:
            return
        if not inserted:
            self._spent[job.account_id] -= job.reserved_usd_micros
            return
        self._ledger_rows.append(
            {
                "account_id": job.account_id,
                "job_id": job.id,
                "kind": "reserve",
                "amount_usd_micros": -job.reserved_usd_micros,
                "time": job.create_time,
                "note": "quoted at submit",
            }
        )

    async def write(self, conn: AsyncConnection) -> None:
        """Write the reservations: new balances, and a ledger row per job with the balance after it."""
        if not self._ledger_rows:
            return
        running = dict(self._budgets)
        for row in self._ledger_rows:
            running[row["account_id"]] += row["amount_usd_micros"]
            row["balance_usd_micros"] = running[row["account_id"]]
        now = self._ledger_rows[-1]["time"]
        await conn.execute(
            update(accounts)
            .where(accounts.c.account_id == bindparam("b_account"))
            .values(balance_usd_micros=bindparam("b_balance"), update_time=now),
            [
                {"b_account": account, "b_balance": self._budgets[account] - amount}
                for account, amount in self._spent.items()
                if amount
            ],
        )
        await conn.execute(insert(ledger), self._ledger_rows)


async def settle(conn: AsyncConnection, job: Job, now: datetime) -> None:
    """At a terminal status: return what the job did not cost (everything, unless it completed)."""
    if not job.status.terminal or job.reserved_usd_micros <= 0:
        return
    if job.status is JobStatus.COMPLETED:
        kind, delta = "settle", job.reserved_usd_micros - job.cost_usd_micros
        note = f"cost {job.cost_usd_micros} of {job.reserved_usd_micros} reserved"
    else:
        kind, delta = "refund", job.reserved_usd_micros
        note = f"job {job.status.value}: free"
    balance = (
        await conn.execute(
            update(accounts)
            .where(accounts.c.account_id == job.account_id)
            .values(balance_usd_micros=accounts.c.balance_usd_micros + delta, update_time=now)
            .returning(accounts.c.balance_usd_micros)
        )
    ).scalar_one_or_none()
    if balance is None:
        return  # the budget was removed meanwhile: the account is unlimited now
    await conn.execute(
        insert(ledger).values(
            account_id=job.account_id,
            job_id=job.id,
            kind=kind,
            amount_usd_micros=delta,
            balance_usd_micros=balance,
            time=now,
            note=note,
        )
    )
