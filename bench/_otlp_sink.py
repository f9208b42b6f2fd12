"""An OTLP/HTTP traces endpoint that accepts and drops what it is sent: the collector of the submit
scenario's traced server, in a process of its own so that receiving spans is not charged to the service.

Prints one JSON line on stdout, `{"endpoint", "pid"}`, then serves until SIGTERM or SIGINT. `GET /stats`
answers how many exports and bytes it received. Bodies are not decoded: a real collector does that on
another machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from aiohttp import web


def main() -> None:
    """Serve until told to stop."""
    asyncio.run(_serve())


async def _serve() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    received = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        received["exports"] += 1
        received["bytes"] += len(await request.read())
        # an empty ExportTraceServiceResponse is zero bytes of protobuf
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(received)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sys.stdout.write(json.dumps({"endpoint": f"http://127.0.0.1:{port}", "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    main()
