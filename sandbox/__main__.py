"""Run a sandbox from a shell: `python -m sandbox --host 127.0.0.1 --port 8400 [--latency 2]`.

Prints one line, the base URL to point adapters at, then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from sandbox.app import Sandbox


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m sandbox", description="Serve local stand-ins for the vendor image APIs."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port of the API host (default 0: any free port)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each task takes (default 0)")
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any non-empty key)")
    parser.add_argument(
        "--result-ttl", type=float, default=600.0, help="seconds a result URL stays valid (default 600)"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        _serve(
            host=args.host,
            port=args.port,
            latency_s=args.latency,
            api_key=args.api_key,
            result_ttl_s=args.result_ttl,
        )
    )


async def _serve(*, host: str, port: int, latency_s: float, api_key: str | None, result_ttl_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Sandbox.running(
        host=host, port=port, latency_s=latency_s, api_key=api_key, result_ttl_s=result_ttl_s
    ) as sandbox:
        print(sandbox.base_url, flush=True)
        print(
            f"sandbox: submit to {sandbox.base_url}, results on {sandbox.cluster_url}; "
            "stop with Ctrl-C or SIGTERM",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()


if __name__ == "__main__":
    main()
