"""Entry point: `python -m server serve | migrate | backlog | token | budget` (also `imagegen-server`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from decimal import Decimal, InvalidOperation

from providers.catalog import CatalogError
from server.app import freeze_startup_heap, running_app, vendor_caps
from server.auth import AuthConfigError, caller_entry, new_token
from server.logs import configure_logging
from server.settings import Settings, SettingsError
from storage import backlog, migrate
from storage.db import make_engine
from storage.errors import NoBudget
from storage.jobs import SqlJobStore

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, read the settings once, and run the command."""
    parser = argparse.ArgumentParser(prog="imagegen-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC and HTTP, and run the worker")
    serve.add_argument("--role", choices=("all", "api", "worker"), help="overrides IMAGEGEN_ROLE")
    serve.add_argument("--migrate", action="store_true", help="migrate the database before serving")
    commands.add_parser("migrate", help="bring the database to the newest schema and exit")
    count = commands.add_parser(
        "backlog", help="count the pending jobs a worker could claim now, under the vendor and account caps"
    )
    count.add_argument(
        "--with-processing",
        action="store_true",
        help="add the processing jobs: the worker slots wanted now (what the autoscaler scales on)",
    )
    count.add_argument("--sql", action="store_true", help="print the statement instead of running it")
    token = commands.add_parser("token", help="make a caller token and print its tokens-file entry")
    token.add_argument("--name", required=True, help="who will use the token, e.g. ads-backend")
    token.add_argument("--accounts", default="*", help="comma-separated account ids, or * for all")
    budget = commands.add_parser("budget", help="set, read and audit accounts' credit budgets")
    budget.add_argument("action", choices=("set", "add", "show", "ledger", "remove"))
    budget.add_argument("account")
    budget.add_argument("usd", nargs="?", help="amount in USD, for set and add (e.g. 25 or -2.50)")
    budget.add_argument("--note", default="", help="why, kept in the ledger")
    budget.add_argument("--limit", type=int, default=20, help="ledger entries to show")
    args = parser.parse_args(argv)
    if args.command == "token":
        secret = new_token()
        accounts = (
            None if args.accounts == "*" else [a.strip() for a in args.accounts.split(",") if a.strip()]
        )
        print(f"token (give it to {args.name}; it is not stored anywhere): {secret}")
        print('add to IMAGEGEN_AUTH_TOKENS_FILE under "callers":')
        print(json.dumps(caller_entry(args.name, secret, accounts)))
        return 0

    try:
        overrides = {"role": args.role} if getattr(args, "role", None) else {}
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "migrate":
        logging.getLogger("alembic").setLevel(logging.INFO)
        asyncio.run(_migrate(settings))
        return 0
    if args.command == "budget":
        return asyncio.run(_budget(settings, args))
    if args.command == "backlog":
        return _backlog(settings, args)
    try:
        asyncio.run(_serve(settings, migrate_schema=args.migrate))
    except (AuthConfigError, CatalogError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _migrate(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    try:
        await migrate.upgrade(engine)
        log.info("database at revision %s", await migrate.current_revision(engine))
    finally:
        await engine.dispose()


def _backlog(settings: Settings, args: argparse.Namespace) -> int:
    caps, per_account = vendor_caps(settings), settings.max_in_flight_per_account
    if args.sql:
        print(backlog.claimable_sql(caps, per_account=per_account, with_processing=args.with_processing))
        return 0

    async def count() -> backlog.Backlog:
        engine = make_engine(settings.database_url, statement_timeout_s=settings.db_timeout_s)
        try:
            return await backlog.backlog(engine, caps, per_account=per_account)
        finally:
            await engine.dispose()

    try:
        counted = asyncio.run(count())
    except ValueError as exc:
        print(f"backlog: {exc}", file=sys.stderr)
        return 2
    print(counted.demand if args.with_processing else counted.claimable)
    return 0


async def _budget(settings: Settings, args: argparse.Namespace) -> int:
    if args.action in ("set", "add"):
        try:
            micros = int((Decimal(args.usd or "") * 1_000_000).to_integral_value())
        except InvalidOperation:
            print(f"budget {args.action} needs an amount in USD, e.g. 25.00", file=sys.stderr)
            return 2
    engine = make_engine(settings.database_url)
    store = SqlJobStore(engine)
    try:
        if args.action == "set":
            print(
                f"{args.account}: ${await store.set_budget(args.account, micros, note=args.note) / 1e6:.6f}"
            )
        elif args.action == "add":
            try:
                balance = await store.add_credit(args.account, micros, note=args.note)
            except NoBudget:
                print(f"{args.account} has no budget (unlimited); use 'budget set' first", file=sys.stderr)
                return 1
            print(f"{args.account}: ${balance / 1e6:.6f}")
        elif args.action == "show":
            current = await store.budget(args.account)
            print(
                f"{args.account}: "
                + ("unlimited (no budget)" if current is None else f"${current / 1e6:.6f}")
            )
        elif args.action == "remove":
            removed = await store.remove_budget(args.account)
            print(f"{args.account}: " + ("budget removed; unlimited" if removed else "had no budget"))
        else:
            for entry in await store.ledger_entries(args.account, limit=args.limit):
                job = str(entry.job_id) if entry.job_id else "-"
                print(
                    f"{entry.time.isoformat(timespec='seconds')}  {entry.kind:<7} "
                    f"{entry.amount_usd_micros / 1e6:>+12.6f}"
                    f"  balance {entry.balance_usd_micros / 1e6:>12.6f}  job {job}  {entry.note}"
                )
    finally:
        await store.close()
        await engine.dispose()
    return 0


async def _serve(settings: Settings, *, migrate_schema: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_app(settings, migrate_schema=migrate_schema):
        freeze_startup_heap()
        await stop.wait()
        log.info("shutting down (grace %.0f s)", settings.shutdown_grace_s)
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
