"""Errors of the storage layer. Each states a fact; the server maps them to gRPC codes.

StorageError
├── JobNotFound            no such job in this account
├── IdempotencyConflict    request_id reused with a different body
├── InvalidTransition      the job's status does not allow the change (e.g. cancel a completed job)
├── LeaseLost              a worker's fenced write found the job no longer held by it
├── InsufficientCredit     the account's budget cannot cover the job's quote
├── NoBudget               credit was added to an account that has no budget
├── StoreUnavailable       the database could not be reached
│   └── SchemaBehind       the database answers, but its schema was not migrated to this release's
├── BlobExists             a create-only blob write found its key taken
├── BlobNotFound           no blob under this key
└── BlobStoreUnavailable   the blob store could not be reached or refused to work
"""

from __future__ import annotations

import uuid


class StorageError(Exception):
    """Something the job store could not do."""


class JobNotFound(StorageError):
    """No job with this id exists in the caller's account."""

    def __init__(self, job_id: uuid.UUID | str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class IdempotencyConflict(StorageError):
    """A request_id was reused with a different request body."""

    def __init__(self, request_id: str, job_id: uuid.UUID) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for job {job_id} with a different request"
        )
        self.request_id = request_id
        self.job_id = job_id


class InvalidTransition(StorageError):
    """The job's current status does not allow the requested change."""

    def __init__(self, job_id: uuid.UUID, status: str, action: str) -> None:
        super().__init__(f"job {job_id} is {status}; cannot {action}")
        self.job_id = job_id
        self.status = status


class LeaseLost(StorageError):
    """The job is no longer held by this worker and attempt (cancelled, expired or taken over)."""

    def __init__(self, job_id: uuid.UUID, attempt: int) -> None:
        super().__init__(f"job {job_id} attempt {attempt} no longer holds its lease")
        self.job_id = job_id
        self.attempt = attempt


class StoreUnavailable(StorageError):
    """The database could not be reached or answered with a connection-level error."""


class SchemaBehind(StoreUnavailable):
    """The database lacks this release's tables or columns: it must be migrated before it can serve."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the database schema is not current ({detail}): run `python -m server migrate` "
            "(or serve --migrate)"
        )


class InsufficientCredit(StorageError):
    """The account's balance is below the job's quote; nothing was created or reserved."""

    def __init__(self, account_id: str, balance_usd_micros: int, needed_usd_micros: int) -> None:
        super().__init__(
            f"account {account_id} has ${balance_usd_micros / 1e6:.6f} of credit; this job is quoted at "
            f"${needed_usd_micros / 1e6:.6f}"
        )
        self.account_id = account_id
        self.balance_usd_micros = balance_usd_micros
        self.needed_usd_micros = needed_usd_micros


class NoBudget(StorageError):
    """The account has no budget (it is unlimited), so there is nothing to add credit to."""

    def __init__(self, account_id: str) -> None:
        super().__init__(f"account {account_id} has no budget")
        self.account_id = account_id


class BlobExists(StorageError):
    """A create-only write found its key already holding a blob (which it left as it was)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"blob {key} already exists")
        self.key = key


class BlobNotFound(StorageError):
    """No blob is stored under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"blob {key} not found")
        self.key = key


class BlobStoreUnavailable(StorageError):
    """The blob store could not be reached, timed out, or refused the request (e.g. bad credentials)."""
