"""Schema migrations: bring a database to the newest schema, or tell whether it is there."""

from __future__ import annotations

import functools

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "storage:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every migration the database lacks (idempotent)."""
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(_config(sync), "head"))


@functools.cache
def head_revision() -> str | None:
    """The newest migration in this build.

    Read once: it cannot change while the process runs, and reading it loads and compiles every migration
    script on the event loop, which readiness would pay at every check."""
    return ScriptDirectory.from_config(_config()).get_current_head()


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every migration this build has, old and new."""
    return frozenset(script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions())


def serves_revision(current: str | None) -> bool:
    """Whether this build can serve a database at `current`.

    Its own head, or a revision it does not know: a newer release migrated first, and migrations only
    add (columns with defaults, tables), so the release before keeps serving during the rollout.
    """
    return current is not None and (current == head_revision() or current not in known_revisions())


async def current_revision(engine: AsyncEngine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
