"""Every model of the catalog, end to end through the gRPC API, on its vendor's sandbox.

Sizes: the output is exactly what was asked, whatever the model's native sizes. Faults: each sandbox
fault ends in the state the README documents (completed after a retry, or failed with its code, free).
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import grpc
import pytest
from PIL import Image

from imagegen.v1 import imagegen_pb2 as pb
from providers.catalog import CATALOG
from tests.helpers import bad_fields, events_until_end

MODELS = sorted(CATALOG)
PLACEMENTS = [(1024, 1024), (1080, 1920), (1920, 1080)]

#: fault tag → (final status, error code, attempts the job took)
FAULTS = {
    "[sandbox:moderated]": (pb.JOB_STATUS_FAILED, "CONTENT_MODERATED", 1),
    "[sandbox:moderated-output]": (pb.JOB_STATUS_FAILED, "CONTENT_MODERATED", 1),
    "[sandbox:rate-limited]": (pb.JOB_STATUS_COMPLETED, "", 2),
    "[sandbox:rate-limited=0.1]": (pb.JOB_STATUS_COMPLETED, "", 2),
    "[sandbox:server-error]": (pb.JOB_STATUS_COMPLETED, "", 2),
    "[sandbox:disconnect]": (pb.JOB_STATUS_COMPLETED, "", 2),
    "[sandbox:slow=0.3]": (pb.JOB_STATUS_COMPLETED, "", 1),
    "[sandbox:no-image]": (pb.JOB_STATUS_FAILED, "INVALID_PROVIDER_RESPONSE", 1),
    "[sandbox:malformed]": (pb.JOB_STATUS_FAILED, "PROVIDER_UNAVAILABLE", 4),
    "[sandbox:down]": (pb.JOB_STATUS_FAILED, "PROVIDER_UNAVAILABLE", 4),
}


@pytest.mark.parametrize("model", MODELS)
async def test_every_model_delivers_exactly_the_requested_sizes(stub, model: str) -> None:
    submitted = []
    for width, height in PLACEMENTS:
        for variants in (1, 4):
            job = await stub.GenerateImage(
                pb.GenerateImageRequest(
                    prompt=f"a poster for a summer sale, {width}x{height}",
                    provider=model,
                    width=width,
                    height=height,
                    num_variants=variants,
                    output_format=pb.OUTPUT_FORMAT_JPEG,
                )
            )
            submitted.append(job)
    histories = await asyncio.gather(*(events_until_end(stub, job.id, timeout=60) for job in submitted))
    async with aiohttp.ClientSession() as http:
        for job, events in zip(submitted, histories, strict=True):
            done = events[-1].job
            assert done.status == pb.JOB_STATUS_COMPLETED, (model, done.error)
            assert len(done.images) == job.num_variants
            assert done.cost_usd_micros > 0 and done.cost_cents >= 1
            for image in done.images:
                assert (image.width, image.height) == (job.width, job.height)
                assert image.native_width > 0 and image.native_height > 0
                async with http.get(image.url) as response:
                    body = await response.read()
                assert response.status == 200, (response.status, body[:200])
                decoded = Image.open(io.BytesIO(body))
                assert decoded.format == "JPEG" and decoded.size == (job.width, job.height)


@pytest.mark.parametrize("model", MODELS)
async def test_every_fault_ends_in_its_documented_state(stub, model: str) -> None:
    jobs = {
        tag: await stub.GenerateImage(
            pb.GenerateImageRequest(
                prompt=f"{model} product shot {tag}", provider=model, width=512, height=512
            )
        )
        for tag in FAULTS
    }
    # after_version=1 replays the whole history, however far the job got before the watch began
    histories = await asyncio.gather(
        *(events_until_end(stub, job.id, after_version=1, timeout=60) for job in jobs.values())
    )
    for (tag, (status, code, attempts)), events in zip(FAULTS.items(), histories, strict=True):
        job = events[-1].job
        assert (job.status, job.error.code, job.attempt) == (status, code, attempts), (model, tag, job.error)
        if status == pb.JOB_STATUS_FAILED:
            assert job.cost_usd_micros == 0 and job.error.message
            assert job.error.retryable is (code == "PROVIDER_UNAVAILABLE")
        else:
            assert job.cost_usd_micros > 0
        if attempts > 1:
            retries = [
                e.message for e in events if e.job.status == pb.JOB_STATUS_PENDING and e.previous_status
            ]
            assert retries and all("retrying in" in message for message in retries), (model, tag, retries)


async def test_unsupported_options_are_refused_per_model(stub) -> None:
    cases = [
        (pb.GenerateImageRequest(prompt="x", provider="gpt_image_1_5", seed=3), "seed", "gpt_image_1_5"),
        (pb.GenerateImageRequest(prompt="x", provider="seedream_4_5", seed=3), "seed", "seedream_4_5"),
        (
            pb.GenerateImageRequest(
                prompt="x", provider="nano_banana", reference_image_urls=["https://a.test/x.png"] * 4
            ),
            "reference_image_urls",
            "nano_banana",
        ),
        (
            pb.GenerateImageRequest(
                prompt="x", provider="flux_2_pro", reference_image_urls=["https://a.test/x.png"] * 9
            ),
            "reference_image_urls",
            "flux_2_pro",
        ),
    ]
    for request, field, model in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(request)
        assert model in bad_fields(caught.value)[field]
    from google.protobuf import struct_pb2

    options = struct_pb2.Struct()
    options.update({"optimize_prompt": "fast"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="x", provider="seedream_4_5", provider_options=options)
        )
    assert "provider_options.optimize_prompt" in bad_fields(caught.value)
    accepted = await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="x", provider="seedream_4", provider_options=options, validate_only=True
        )
    )
    assert accepted.provider_options["optimize_prompt"] == "fast"
