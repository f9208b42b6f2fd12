"""Credits through the API: reserve at submit, settle or refund at the end, never overspend."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from tests.conftest import authed_channel, test_settings
from tests.helpers import finished, status_details

ROOT = Path(__file__).resolve().parent.parent


async def test_parallel_submits_never_overspend_a_small_balance(tmp_path: Path, database_url: str) -> None:
    settings = test_settings(tmp_path, database_url, secured=True, role="api")  # jobs stay reserved
    async with running_app(settings) as app, authed_channel(app.grpc_target, account="acme") as channel:
        await app.store.set_budget("acme", 5 * 30_000)  # five 1024x1024 FLUX.2 images
        stub = pb_grpc.ImageGenerationStub(channel)

        async def submit(index: int) -> pb.Job | grpc.aio.AioRpcError:
            try:
                return await stub.GenerateImage(pb.GenerateImageRequest(prompt=f"ad {index}"))
            except grpc.aio.AioRpcError as error:
                return error

        outcomes = await asyncio.gather(*(submit(i) for i in range(40)))
        jobs = [o for o in outcomes if isinstance(o, pb.Job)]
        errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(jobs) == 5 and len(errors) == 35
        for error in errors:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            [detail] = status_details(error).details
            failure = error_details_pb2.QuotaFailure()
            assert detail.Unpack(failure) and failure.violations[0].subject == "account:acme"
        assert await app.store.budget("acme") == 0
        assert len(await app.store.ledger_entries("acme")) == 6  # the budget and five reservations
        # another account without a budget is unlimited
        async with authed_channel(app.grpc_target, account="globex") as other:
            await pb_grpc.ImageGenerationStub(other).GenerateImage(
                pb.GenerateImageRequest(prompt="free rein")
            )


async def test_completion_settles_the_vendors_figure_and_failures_refund(secured_app: App) -> None:
    app = secured_app
    await app.store.set_budget("acme", 1_000_000)
    async with authed_channel(app.grpc_target, account="acme") as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        options = struct_pb2.Struct()
        options.update({"quality": "low"})
        job = await stub.GenerateImage(
            pb.GenerateImageRequest(
                prompt="poster: 50% off", provider="gpt_image_1_5", provider_options=options
            )
        )
        assert job.estimated_cost_usd_micros == 9_000
        done = await finished(stub, job.id)
        assert done.status == pb.JOB_STATUS_COMPLETED
        actual = done.cost_usd_micros  # from OpenAI's usage figures, not the quote
        assert 0 < actual != 9_000
        moderated = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x [sandbox:moderated]"))
        assert (await finished(stub, moderated.id)).status == pb.JOB_STATUS_FAILED

    assert await app.store.budget("acme") == 1_000_000 - actual
    entries = [(e.kind, e.amount_usd_micros) for e in reversed(await app.store.ledger_entries("acme"))]
    assert entries == [
        ("set", 1_000_000),
        ("reserve", -9_000),
        ("settle", 9_000 - actual),
        ("reserve", -30_000),
        ("refund", 30_000),
    ]


def test_the_budget_command(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(
        IMAGEGEN_DATABASE_URL=database_url, IMAGEGEN_DATA_DIR=str(tmp_path), IMAGEGEN_LOG_FORMAT="text"
    )

    def budget(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "server", "budget", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert budget("show", "acme") == "acme: unlimited (no budget)\n"
    assert budget("set", "acme", "25", "--note", "November") == "acme: $25.000000\n"
    assert budget("add", "acme", "-2.5") == "acme: $22.500000\n"
    ledger = budget("ledger", "acme")
    assert "set" in ledger and "November" in ledger and "-2.500000" in ledger
    assert budget("remove", "acme") == "acme: budget removed; unlimited\n"
    refused = subprocess.run(
        [sys.executable, "-m", "server", "budget", "add", "acme", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "no budget" in refused.stderr
    with pytest.raises(AssertionError):
        budget("set", "acme", "lots")
