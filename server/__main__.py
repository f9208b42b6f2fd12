"""Entry point: `python -m server serve | migrate | backlog | token | budget | webhook` (also
`imagegen-server`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from providers.catalog import CatalogError
from providers.references import parse_networks
from server.app import freeze_startup_heap, running_app, vendor_caps
from server.auth import AuthConfigError, caller_entry, new_token
from server.logs import configure_logging
from server.settings import Settings, SettingsError
from server.webhooks import target_violation
from storage import backlog, migrate
from storage.db import make_engine
from storage.errors import NoBudget
from storage.jobs import SqlJobStore
from storage.webhooks import DEFAULT_WEBHOOK_STATUSES, WEBHOOK_STATUSES

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
    webhook = commands.add_parser("webhook", help="administer accounts' webhook endpoints and secrets")
    hooks = webhook.add_subparsers(dest="action", required=True)
    add = hooks.add_parser("add", help="add an endpoint (and the account's secret, shown once, if new)")
    add.add_argument("account")
    add.add_argument("url")
    add.add_argument(
        "--events",
        default=",".join(DEFAULT_WEBHOOK_STATUSES),
        help=f"comma-separated, of {','.join(WEBHOOK_STATUSES)} (default: the terminal ones)",
    )
    hooks.add_parser("list", help="list endpoints").add_argument("account", nargs="?")
    hooks.add_parser("remove", help="remove an endpoint").add_argument("endpoint_id")
    rotate = hooks.add_parser(
        "rotate-secret", help="a new secret (shown once); the old one signs too for a while"
    )
    rotate.add_argument("account")
    rotate.add_argument(
        "--overlap-hours", type=float, default=24.0, help="how long the old secret still signs"
    )
    shown = hooks.add_parser("deliveries", help="an account's recent deliveries, newest first")
    shown.add_argument("account")
    shown.add_argument("--status", choices=("pending", "delivered", "failed"))
    shown.add_argument("--limit", type=int, default=20)
    hooks.add_parser("redeliver", help="send a delivery again (same webhook-id)").add_argument("delivery_id")
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
    if args.command == "webhook":
        return asyncio.run(_webhook(settings, args))
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


async def _webhook(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "add":
        statuses = tuple(s.strip() for s in args.events.split(",") if s.strip())
        unknown = [s for s in statuses if s not in WEBHOOK_STATUSES]
        if unknown or not statuses:
            print(f"--events: choose from {','.join(WEBHOOK_STATUSES)}", file=sys.stderr)
            return 2
        violation = target_violation(args.url, parse_networks(settings.webhook_allow_networks))
        if violation is not None:
            print(f"the URL {violation}", file=sys.stderr)
            return 2
    engine = make_engine(settings.database_url)
    store = SqlJobStore(engine)
    try:
        if args.action == "add":
            endpoint, secret = await store.add_endpoint(args.account, args.url, statuses)
            print(f"{endpoint.id}  {args.account}  {endpoint.url}  events {','.join(endpoint.statuses)}")
            if secret is not None:
                print(f"signing secret of {args.account} (shown once; give it to the receiver): {secret}")
        elif args.action == "list":
            for endpoint in await store.endpoints(args.account):
                state = "enabled" if endpoint.enabled else f"disabled ({endpoint.disabled_reason})"
                print(
                    f"{endpoint.id}  {endpoint.account_id}  {endpoint.url}  "
                    f"events {','.join(endpoint.statuses)}  {state}"
                )
        elif args.action == "remove":
            removed = await store.remove_endpoint(args.endpoint_id)
            print(f"{args.endpoint_id}: " + ("removed" if removed else "no such endpoint"))
            return 0 if removed else 1
        elif args.action == "rotate-secret":
            secret = await store.rotate_secret(args.account, overlap=timedelta(hours=args.overlap_hours))
            print(
                f"new signing secret of {args.account} (shown once): {secret}\n"
                f"the previous one also signs for {args.overlap_hours:g} h"
            )
        elif args.action == "deliveries":
            for d in await store.deliveries(args.account, limit=args.limit, status=args.status):
                code = d.last_status_code if d.last_status_code is not None else "-"
                target = d.endpoint_id or d.url
                print(
                    f"{d.id}  {d.create_time.isoformat(timespec='seconds')}  {d.event_type:<14} "
                    f"job {d.job_id} v{d.job_version}  {d.status:<9} attempts {d.attempts}  "
                    f"last {code} {d.last_error}  to {target}"
                )
        else:
            found = await store.redeliver(args.delivery_id)
            print(f"{args.delivery_id}: " + ("queued again" if found else "no such delivery"))
            return 0 if found else 1
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
