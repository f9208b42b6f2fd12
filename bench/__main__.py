"""`python -m bench [--scenario NAME]… [--quick] [--output PATH] [--profile] [--no-tracing]`: run the
scenarios, print a table, write JSON.

Each run creates its own PostgreSQL database (from IMAGEGEN_BENCH_DATABASE_URL, else
IMAGEGEN_TEST_DATABASE_URL, else the local server), migrates it, empties it between scenarios and drops
it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._harness import (
    DEFAULT_SERVER,
    RunContext,
    ScenarioResult,
    drop_databases,
    fresh_database,
    postgres_version,
    raise_open_files_limit,
)

SCENARIOS = ("submit", "watch", "pipeline", "inflight", "images")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the scenarios, print the table and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke sizes: about a second per scenario")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record a py-spy profile of the server under test (bench/profile-<scenario>.*)",
    )
    parser.add_argument(
        "--no-tracing",
        action="store_true",
        help="submit: leave out the service with tracing on (the echo and the untraced service only)",
    )
    args = parser.parse_args(argv)
    report = asyncio.run(
        _run(
            args.scenario or list(SCENARIOS),
            quick=args.quick,
            profile=args.profile,
            tracing=not args.no_tracing,
        )
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(render_table([f for s in report["scenarios"].values() for f in s["figures"]]))
    print(f"\nresults written to {args.output}")
    failed = [name for name, s in report["scenarios"].items() if s.get("error")]
    if failed:
        print(f"scenarios that did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


async def _run(names: Sequence[str], *, quick: bool, profile: bool, tracing: bool = True) -> dict[str, Any]:
    raise_open_files_limit()
    admin_url = os.environ.get("IMAGEGEN_BENCH_DATABASE_URL") or os.environ.get(
        "IMAGEGEN_TEST_DATABASE_URL", DEFAULT_SERVER
    )
    started = datetime.now(UTC)
    scenarios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as scratch:
        async with fresh_database(admin_url) as (admin_dsn, database_url):
            ctx = RunContext(
                run_dir=Path(scratch),
                admin_dsn=admin_dsn,
                database_url=database_url,
                quick=quick,
                profile=profile,
                tracing=tracing,
            )
            machine = await _machine(admin_dsn)
            try:
                for name in names:
                    await ctx.reset()
                    print(f"[bench] {name} …", file=sys.stderr, flush=True)
                    began = time.monotonic()
                    module = importlib.import_module(f"bench.{name}")
                    try:
                        result: ScenarioResult = await module.run(ctx)
                    except Exception as exc:  # one broken scenario must not hide the others' figures
                        traceback.print_exc()
                        scenarios[name] = {"figures": [], "error": f"{type(exc).__name__}: {exc}"}
                        continue
                    scenarios[name] = {
                        "figures": [figure.to_json() for figure in result.figures],
                        "details": result.details,
                        "seconds": round(time.monotonic() - began, 1),
                    }
                    print(
                        f"[bench] {name} done in {time.monotonic() - began:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                await drop_databases(ctx)
    return {
        "timestamp": started.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine,
        "scenarios": scenarios,
    }


async def _machine(admin_dsn: str) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc  # only for its version

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": await postgres_version(admin_dsn),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def render_table(figures: Sequence[dict[str, Any]]) -> str:
    """The figures as one aligned text table."""
    header = ("scenario", "figure", "value", "baseline", "ratio", "target", "met?")
    rows = [header]
    for f in figures:
        met = {True: "yes", False: "NO", None: "-"}[f["met"]]
        rows.append(
            (
                f["scenario"],
                f["figure"],
                _number(f["value"], f["unit"]),
                _number(f["baseline"], f["unit"]),
                f"{f['ratio']:.2f}x" if f["ratio"] is not None else "-",
                f["target"] or "-",
                met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


if __name__ == "__main__":
    sys.exit(main())
