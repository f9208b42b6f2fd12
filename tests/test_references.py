"""Reference image URLs are untrusted: they never reach inside our network, and only real images pass."""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.references import ForbiddenAddress, PublicOnlyConnector, parse_networks
from server.app import running_app
from tests.conftest import test_settings
from tests.helpers import bad_fields, finished


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    """A local web server with good and bad reference images, and redirects inward."""
    app = web.Application()
    png = _png()

    async def good(_r: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    async def text(_r: web.Request) -> web.Response:
        return web.Response(text="<html>not an image</html>", content_type="text/html")

    async def liar(_r: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"garbage" * 100, content_type="image/png")

    async def huge(_r: web.Request) -> web.Response:
        return web.Response(body=png + b"\0" * (8 * 1024 * 1024), content_type="image/png")

    async def to_metadata(_r: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/iam")

    async def to_private(_r: web.Request) -> web.Response:
        raise web.HTTPFound("http://10.20.30.40/admin")

    app.add_routes(
        [
            web.get("/good.png", good),
            web.get("/page.png", text),
            web.get("/liar.png", liar),
            web.get("/huge.png", huge),
            web.get("/to-metadata", to_metadata),
            web.get("/to-private", to_private),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        await web.SockSite(runner, listener).start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            await runner.cleanup()


class _Names(AbstractResolver):
    """DNS as an attacker would arrange it: public-looking names that lead inside."""

    def __init__(self, names: dict[str, str]) -> None:
        self._names = names

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        address = self._names[host]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "proto": 0,
                "flags": 0,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
            }
        ]

    async def close(self) -> None:
        pass


async def test_the_connector_refuses_every_inward_address(image_host: str) -> None:
    port = image_host.rsplit(":", 1)[1]
    names = {
        "metadata.attacker.test": "169.254.169.254",
        "intranet.attacker.test": "10.1.2.3",
        "loopback.attacker.test": "127.0.0.1",
        "v6.attacker.test": "::1",
        "mapped.attacker.test": "::ffff:127.0.0.1",
        "cgnat.attacker.test": "100.64.0.9",
    }
    connector = PublicOnlyConnector(resolver=_Names(names))
    async with aiohttp.ClientSession(connector=connector) as http:
        urls = [f"http://{name}:{port}/good.png" for name in names]
        urls += [
            f"{image_host}/good.png",
            f"http://[::1]:{port}/good.png",
            "http://0.0.0.0/",
            f"http://[::ffff:127.0.0.1]:{port}/good.png",
            "http://169.254.169.254/latest/meta-data",
        ]
        for url in urls:
            with pytest.raises(ForbiddenAddress):
                async with http.get(url):
                    pass
        for legacy in ("http://2130706433/", "http://127.1/"):  # numeric forms a resolver would accept
            with pytest.raises(ForbiddenAddress):
                async with http.get(legacy):
                    pass

    # allowing loopback (sandbox and tests only) lets the first hop through, but not where it redirects
    connector = PublicOnlyConnector(allow=parse_networks("127.0.0.1/32"))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{image_host}/good.png") as response:
            assert response.status == 200
        for hop in ("to-metadata", "to-private"):
            with pytest.raises(ForbiddenAddress):
                async with http.get(f"{image_host}/{hop}"):
                    pass
        with pytest.raises(ForbiddenAddress):
            async with http.get(f"http://[::1]:{port}/good.png"):  # ::1 is not 127.0.0.1/32
                pass


async def test_inward_urls_are_refused_at_submit(stub) -> None:
    urls = [
        "http://127.0.0.1:9/x.png",
        "http://2130706433/x.png",
        "http://0x7f000001/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:7f00:1]/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.8/x.png",
        "http://192.168.1.1/x.png",
        "http://localhost/x.png",
        "http://metadata.google.internal/x",
        "ftp://example.com/x.png",
        "http://user:secret@example.com/x.png",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="x", provider="nano_banana_pro", reference_image_urls=urls[:14])
        )
    fields = bad_fields(caught.value)
    assert set(fields) == {f"reference_image_urls[{i}]" for i in range(len(urls))}


@pytest.fixture
async def allowing_stub(tmp_path: Path, database_url: str) -> AsyncIterator[pb_grpc.ImageGenerationStub]:
    """A server whose reference fetches may reach 127.0.0.1 (the test's image host), and nothing else."""
    settings = test_settings(tmp_path, database_url, reference_allow_networks="127.0.0.1/32")
    async with running_app(settings) as app, grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield pb_grpc.ImageGenerationStub(channel)


@pytest.mark.parametrize(
    ("model", "path", "status", "message"),
    [
        ("gpt_image_1_5", "good.png", pb.JOB_STATUS_COMPLETED, ""),
        ("nano_banana", "good.png", pb.JOB_STATUS_COMPLETED, ""),
        ("gpt_image_1_5", "page.png", pb.JOB_STATUS_FAILED, "not an image"),
        ("nano_banana", "liar.png", pb.JOB_STATUS_FAILED, "not a readable image"),
        ("nano_banana", "huge.png", pb.JOB_STATUS_FAILED, "bytes"),
        ("gpt_image_1_5", "to-metadata", pb.JOB_STATUS_FAILED, "169.254.169.254"),
        ("nano_banana", "to-private", pb.JOB_STATUS_FAILED, "10.20.30.40"),
    ],
)
async def test_references_are_fetched_safely_end_to_end(
    allowing_stub, image_host, model, path, status, message
) -> None:
    job = await allowing_stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="the same bag on a beach",
            provider=model,
            width=256,
            height=256,
            reference_image_urls=[f"{image_host}/{path}"],
        )
    )
    done = await finished(allowing_stub, job.id)
    assert done.status == status, done.error
    if status == pb.JOB_STATUS_FAILED:
        assert done.error.code == "PROVIDER_REJECTED" and not done.error.retryable and done.attempt == 1
        assert message in done.error.message, done.error.message
        assert done.cost_usd_micros == 0
