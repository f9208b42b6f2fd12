"""A static file server in a process of its own, for timing image downloads without the sandbox's drawing.

`python -m bench._files DIRECTORY` serves DIRECTORY under `/`, prints `{"base_url", "pid"}` on stdout,
and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web


def main() -> None:
    """Serve the directory named on the command line until told to stop."""
    asyncio.run(_serve(Path(sys.argv[1])))


async def _serve(directory: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = web.Application()
    app.router.add_static("/", directory)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        await web.SockSite(runner, listener).start()
        port = listener.getsockname()[1]
        sys.stdout.write(json.dumps({"base_url": f"http://127.0.0.1:{port}", "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    main()
