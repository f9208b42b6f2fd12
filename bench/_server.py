"""The service under test, in a process of its own so that its CPU and memory can be read from /proc.

Configured like production, from IMAGEGEN_* variables (`bench._harness.server_env` sets them). Once it
serves it prints one JSON line on stdout, `{"grpc_target", "http_url", "pid"}`, since at WARNING the
service's own "serving gRPC" log line is not written. Serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from bench._harness import raise_open_files_limit
from server.app import freeze_startup_heap, running_app
from server.logs import configure_logging
from server.settings import Settings


def main() -> None:
    """Read the settings from the environment and serve until told to stop."""
    raise_open_files_limit()  # 10,000 watch streams and 5,000 vendor connections need descriptors
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_app(settings) as app:
        freeze_startup_heap()  # as `python -m server serve` does
        sys.stdout.write(
            json.dumps({"grpc_target": app.grpc_target, "http_url": app.http_url, "pid": os.getpid()}) + "\n"
        )
        sys.stdout.flush()
        await stop.wait()


if __name__ == "__main__":
    main()
