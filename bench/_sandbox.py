"""The vendor sandbox in a process of its own, so that drawing placeholder images is not charged to the
service under test, and with no cap on BFL's active tasks (the real cap, 24, is the service's business
through IMAGEGEN_VENDOR_CONCURRENCY, which the scenarios switch off to measure one process's capacity).

Prints one JSON line on stdout, `{"base_url", "pid"}`, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from bench._harness import raise_open_files_limit
from sandbox import Sandbox

#: "no cap": more than any scenario submits
UNCAPPED = 1_000_000


def main() -> None:
    """Parse the command line and serve until told to stop."""
    parser = argparse.ArgumentParser(prog="python -m bench._sandbox")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each vendor task takes")
    args = parser.parse_args()
    raise_open_files_limit()
    asyncio.run(_serve(args.latency))


async def _serve(latency_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Sandbox.running(port=0, latency_s=latency_s, bfl_max_active=UNCAPPED) as sandbox:
        sys.stdout.write(json.dumps({"base_url": sandbox.base_url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        await stop.wait()


if __name__ == "__main__":
    main()
