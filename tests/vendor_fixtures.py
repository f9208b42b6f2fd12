"""What the vendor adapters' tests share: the sandbox, a session, a checkpoint, requests, local servers.

tests/conftest.py registers this module as a plugin, so its fixtures (`sandbox`, `session`, `checkpoint`)
are found by name, as conftest's own are; a module that needs a variant (a sandbox with a key, a session
that traces its requests) defines its own fixture of the same name, which takes precedence there. The
plain helpers are imported by name.
"""

from __future__ import annotations

import asyncio
import copy
import io
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from providers.base import GenerationRequest, GenerationResult, ImageProvider, ProviderError
from sandbox import Sandbox

__all__ = [
    "RecordingCheckpoint",
    "checkpoint",
    "decode",
    "generate",
    "generate_error",
    "request_maker",
    "sandbox",
    "serving",
    "session",
]

#: what every test request asks for unless its module or the test says otherwise
_REQUEST_DEFAULTS: Mapping[str, Any] = {
    "job_id": "job-1",
    "width": 1024,
    "height": 1024,
    "num_variants": 1,
    "output_format": "png",
}


class RecordingCheckpoint:
    """An in-memory Checkpoint that keeps every saved state, and the sandbox's BFL poll count at each save.

    Only BFL's adapter saves (it is the asynchronous vendor); a sync vendor's adapter must never use it.
    """

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.saves: list[dict[str, Any]] = []
        self.polls_at_save: list[int] = []
        self._sandbox = sandbox

    async def save(self, state: Mapping[str, Any]) -> None:
        """Keep a copy of `state` (and, with a sandbox, how many BFL polls it had served by then)."""
        self.saves.append(copy.deepcopy(dict(state)))
        if self._sandbox is not None:
            self.polls_at_save.append(self._sandbox.counters["bfl.poll"])

    @property
    def last(self) -> dict[str, Any]:
        """The state saved last."""
        return self.saves[-1]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """Every vendor's sandbox on ephemeral loopback ports, accepting any key."""
    async with Sandbox.running(port=0) as sandbox:
        yield sandbox


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The client session the adapter under test is given."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def checkpoint() -> RecordingCheckpoint:
    """A checkpoint that records what is saved (nothing, for a sync vendor)."""
    return RecordingCheckpoint()


def request_maker(*, model: str, prompt: str, **defaults: Any) -> Callable[..., GenerationRequest]:
    """`make_request(prompt=..., **fields)` for one adapter's tests: a one-variant 1024x1024 PNG of `model`.

    `defaults` replace the shared ones for every request of the module; `fields` replace them for one test.
    """

    def make_request(prompt: str = prompt, **fields: Any) -> GenerationRequest:
        values = {**_REQUEST_DEFAULTS, "model": model, **defaults, "prompt": prompt, **fields}
        return GenerationRequest(**values)

    return make_request


def decode(data: bytes) -> Image.Image:
    """The image the bytes hold, fully loaded (so that a truncated one fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def generate(
    provider: ImageProvider, request: GenerationRequest, checkpoint: RecordingCheckpoint
) -> GenerationResult:
    """`provider.generate(request, checkpoint)`, failing the test if it takes over 10 seconds."""
    async with asyncio.timeout(10):
        return await provider.generate(request, checkpoint)


async def generate_error(
    provider: ImageProvider, request: GenerationRequest, checkpoint: RecordingCheckpoint
) -> ProviderError:
    """The ProviderError `generate` raises (the test fails if it raises none)."""
    with pytest.raises(ProviderError) as caught:
        await generate(provider, request, checkpoint)
    return caught.value


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on an ephemeral loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
