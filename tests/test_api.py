"""GenerateImage, GetJob, ListJobs and ListProviders through a real server on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from imagegen.v1 import imagegen_pb2 as pb
from server.app import App
from tests.helpers import bad_fields, status_details

OTHER_ACCOUNT = (("x-account-id", "acme-ads"),)


async def _count_rows(app: App) -> tuple[int, int]:
    connection = await asyncpg.connect(app.settings.database_url, timeout=10)
    try:
        jobs = await connection.fetchval("SELECT count(*) FROM jobs")
        events = await connection.fetchval("SELECT count(*) FROM job_events")
        return jobs, events
    finally:
        await connection.close()


async def test_generate_with_defaults_returns_a_pending_job_at_once(stub, app) -> None:
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="  a red fox in snow  "))

    assert uuid.UUID(job.id)
    assert job.status == pb.JOB_STATUS_PENDING
    assert job.prompt == "a red fox in snow"  # trimmed
    assert (job.provider, job.width, job.height, job.num_variants) == ("flux_2_pro", 1024, 1024, 1)
    assert job.output_format == pb.OUTPUT_FORMAT_PNG
    assert job.version == 1 and job.attempt == 0
    assert job.account_id == "default"
    assert job.estimated_cost_usd_micros == 30_000  # FLUX.2 [pro]: one megapixel, 3 credits
    assert job.estimated_cost_cents == 3
    assert job.cost_cents == 0
    assert job.HasField("create_time")


@pytest.mark.parametrize(
    ("request_fields", "expected_fields"),
    [
        ({"prompt": ""}, {"prompt"}),
        ({"prompt": "   "}, {"prompt"}),
        ({"prompt": "x" * 2001}, {"prompt"}),
        ({"prompt": "ok", "width": 255}, {"width"}),
        ({"prompt": "ok", "height": 2049}, {"height"}),
        ({"prompt": "ok", "width": -5, "height": 4096}, {"width", "height"}),
        ({"prompt": "ok", "num_variants": 5}, {"num_variants"}),
        ({"prompt": "ok", "num_variants": -1}, {"num_variants"}),
        ({"prompt": "ok", "provider": "dall_e_9"}, {"provider"}),
        ({"prompt": "ok", "folder_id": "../etc"}, {"folder_id"}),
        ({"prompt": "ok", "folder_id": "a/b"}, {"folder_id"}),
        ({"prompt": "ok", "reference_image_urls": ["file:///etc/passwd"]}, {"reference_image_urls[0]"}),
        ({"prompt": "ok", "reference_image_urls": ["https://x.test/a.png"] * 9}, {"reference_image_urls"}),
        ({"prompt": "ok", "output_format": 42}, {"output_format"}),
        ({"prompt": "ok", "request_id": "has space"}, {"request_id"}),
        ({"prompt": "ok", "labels": {"Bad Key": "v"}}, {"labels[Bad Key]"}),
        (
            {"prompt": "a\x00b", "negative_prompt": "x\x00", "labels": {"k": "\x00"}},
            {"prompt", "negative_prompt", "labels[k]"},
        ),
        (
            {"prompt": "", "width": 100, "num_variants": 9, "provider": "nope"},
            {"prompt", "width", "num_variants", "provider"},
        ),
    ],
)
async def test_bad_input_names_every_bad_field_and_writes_nothing(
    stub, app, request_fields, expected_fields
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(**request_fields))

    assert set(bad_fields(caught.value)) == expected_fields
    assert "Traceback" not in (caught.value.details() or "")
    assert await _count_rows(app) == (0, 0)


async def test_provider_specific_limits_are_refused_naming_the_model(stub, app) -> None:
    options = struct_pb2.Struct()
    options.update({"safety_tolerance": 9, "guidance": 3})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="ok", provider_options=options))
    fields = bad_fields(caught.value)
    assert set(fields) == {"provider_options.safety_tolerance", "provider_options.guidance"}
    assert "flux_2_pro" in fields["provider_options.guidance"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="ok", provider="gpt_image_1_5", seed=7))
    assert "gpt_image_1_5" in bad_fields(caught.value)["seed"]
    assert await _count_rows(app) == (0, 0)


async def test_valid_provider_options_are_normalised(stub) -> None:
    options = struct_pb2.Struct()
    options.update({"safety_tolerance": 4})
    job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="ok", provider_options=options, seed=11))
    assert dict(job.provider_options) == {"safety_tolerance": 4}
    assert job.seed == 11


async def test_unconfigured_provider_is_a_failed_precondition(tmp_path, database_url) -> None:
    from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
    from server.app import running_app
    from tests.conftest import test_settings

    # no vendor keys and no sandbox: nothing is configured
    async with (
        running_app(test_settings(tmp_path, database_url, sandbox="off")) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        stub = pb_grpc.ImageGenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="a poster", provider="gpt_image_1_5"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "gpt_image_1_5" in caught.value.details()
        listed = await stub.ListProviders(pb.ListProvidersRequest())
        assert not any(provider.configured for provider in listed.providers)
        assert await _count_rows(app) == (0, 0)


async def test_validate_only_quotes_without_creating(stub, app) -> None:
    job = await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="hero banner", width=1920, height=1080, num_variants=3, validate_only=True
        )
    )
    assert job.id == ""
    assert job.status == pb.JOB_STATUS_UNSPECIFIED
    assert (job.width, job.height, job.num_variants) == (1920, 1080, 3)
    # 1920x1088 native = 2.09 MP -> 3 + 1.5 credits per variant
    assert job.estimated_cost_usd_micros == 3 * 45_000
    assert job.estimated_cost_cents == 14
    assert await _count_rows(app) == (0, 0)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="", validate_only=True))
    assert set(bad_fields(caught.value)) == {"prompt"}


async def test_request_id_makes_submit_idempotent(secured_stub, secured_app) -> None:
    first = await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat", request_id="req-1"))
    again = await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat", request_id="req-1"))
    assert again.id == first.id
    assert again.request_id == "req-1"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="a dog", request_id="req-1"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in caught.value.details()

    # request ids are per account: another account's identical key is a different job
    other = await secured_stub.GenerateImage(
        pb.GenerateImageRequest(prompt="a dog", request_id="req-1"), metadata=OTHER_ACCOUNT
    )
    assert other.id != first.id
    assert (await _count_rows(secured_app))[0] == 2


async def test_concurrent_retries_with_one_request_id_create_one_job(stub, app) -> None:
    request = pb.GenerateImageRequest(prompt="a lighthouse", request_id=f"burst-{uuid.uuid4()}")
    jobs = await asyncio.gather(*(stub.GenerateImage(request) for _ in range(25)))
    assert len({job.id for job in jobs}) == 1
    assert (await _count_rows(app))[0] == 1


async def test_get_job_only_within_the_account(secured_stub) -> None:
    job = await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat"))
    got = await secured_stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert got.id == job.id and got.prompt == "a cat"

    for job_id, metadata in ((job.id, OTHER_ACCOUNT), (str(uuid.uuid4()), ())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await secured_stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured_stub.GetJob(pb.GetJobRequest(job_id="not-a-uuid"))
    assert set(bad_fields(caught.value)) == {"job_id"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await secured_stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=(("x-account-id", "../x"),))
    assert set(bad_fields(caught.value)) == {"x-account-id"}


async def test_list_jobs_newest_first_with_pages_and_filters(secured_stub) -> None:
    created = []
    for index in range(7):
        folder = "campaign-a" if index % 2 else ""
        created.append(
            await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt=f"job {index}", folder_id=folder))
        )
    await secured_stub.GenerateImage(pb.GenerateImageRequest(prompt="elsewhere"), metadata=OTHER_ACCOUNT)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await secured_stub.ListJobs(pb.ListJobsRequest(page_size=3, page_token=token))
        seen += [job.id for job in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [job.id for job in reversed(created)]
    assert pages == 3

    in_folder = await secured_stub.ListJobs(pb.ListJobsRequest(folder_id="campaign-a"))
    assert [job.id for job in in_folder.jobs] == [job.id for job in reversed(created) if job.folder_id]
    in_root = await secured_stub.ListJobs(pb.ListJobsRequest(folder_id="root"))
    assert len(in_root.jobs) == 4

    pending = await secured_stub.ListJobs(
        pb.ListJobsRequest(
            statuses=[pb.JOB_STATUS_PENDING, pb.JOB_STATUS_PROCESSING, pb.JOB_STATUS_COMPLETED]
        )
    )
    assert len(pending.jobs) == 7
    none = await secured_stub.ListJobs(pb.ListJobsRequest(statuses=[pb.JOB_STATUS_CANCELLED]))
    assert list(none.jobs) == []
    by_provider = await secured_stub.ListJobs(pb.ListJobsRequest(provider="gpt_image_1_5"))
    assert list(by_provider.jobs) == []


async def test_list_jobs_rejects_bad_tokens_and_fields(stub) -> None:
    for _ in range(3):
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"))
    page = await stub.ListJobs(pb.ListJobsRequest(page_size=1))
    assert page.next_page_token

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the filter changed under the token
        await stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=page.next_page_token, folder_id="f"))
    assert set(bad_fields(caught.value)) == {"page_token"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListJobs(
            pb.ListJobsRequest(
                page_token="garbage!", page_size=-1, statuses=[pb.JOB_STATUS_UNSPECIFIED], provider="nope"
            )
        )
    assert set(bad_fields(caught.value)) == {"page_token", "page_size", "statuses", "provider"}

    big = await stub.ListJobs(pb.ListJobsRequest(page_size=10_000))  # coerced to the maximum
    assert len(big.jobs) == 3


async def test_list_providers_publishes_the_catalog(stub) -> None:
    response = await stub.ListProviders(pb.ListProvidersRequest())
    providers = {p.id: p for p in response.providers}
    assert set(providers) == {
        "flux_2_pro",
        "gpt_image_1_5",
        "seedream_4",
        "seedream_4_5",
        "nano_banana",
        "nano_banana_pro",
    }
    flux = providers["flux_2_pro"]
    assert flux.configured and flux.supports_seed and flux.max_reference_images == 8
    assert (flux.min_width, flux.max_width, flux.max_variants) == (256, 2048, 4)
    assert flux.price_1024_usd_micros == 30_000 and flux.price_table_version
    assert "safety_tolerance" in flux.provider_option_keys
    assert all(provider.configured for provider in providers.values())  # the sandbox serves every vendor
    assert not providers["gpt_image_1_5"].supports_seed
    assert set(providers["gpt_image_1_5"].provider_option_keys) == {
        "quality",
        "background",
        "moderation",
        "input_fidelity",
    }
    assert providers["nano_banana_pro"].price_1024_usd_micros == 134_400


async def test_store_outage_answers_unavailable_with_retry_info(tmp_path, database_url) -> None:
    from server.app import running_app
    from tests.conftest import test_settings

    # a database URL nobody answers on: the server starts (not ready) and RPCs say UNAVAILABLE quickly
    dead = "postgresql://postgres@127.0.0.1:1/nothing"
    async with (
        running_app(test_settings(tmp_path, dead, db_timeout_s=1.0)) as app,
        grpc.aio.insecure_channel(app.grpc_target) as channel,
    ):
        from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

        stub = pb_grpc.ImageGenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in status_details(caught.value).details)
        assert not app.readiness.ready


async def test_backpressure_answers_resource_exhausted_with_retry_info(tmp_path, database_url) -> None:
    from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
    from server.app import running_app
    from tests.conftest import authed_channel, test_settings

    settings = test_settings(tmp_path, database_url, secured=True, role="api", max_pending_jobs_per_account=2)
    async with running_app(settings) as app, authed_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        for _ in range(2):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="queued"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="one too many"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in status_details(caught.value).details)
        assert (await _count_rows(app))[0] == 2
        # another account's share is its own
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="mine"), metadata=OTHER_ACCOUNT)


async def test_submits_per_minute_are_limited_per_account(tmp_path, database_url) -> None:
    from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
    from server.app import running_app
    from tests.conftest import authed_channel, test_settings

    settings = test_settings(
        tmp_path, database_url, secured=True, role="api", max_submits_per_minute_per_account=3
    )
    async with running_app(settings) as app, authed_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        for _ in range(3):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="quick"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="too quick"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        [retry] = [d for d in status_details(caught.value).details if d.type_url.endswith("RetryInfo")]
        from google.rpc import error_details_pb2

        info = error_details_pb2.RetryInfo()
        assert retry.Unpack(info) and 0 < info.retry_delay.ToTimedelta().total_seconds() <= 60
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="mine"), metadata=OTHER_ACCOUNT)
        assert (await _count_rows(app))[0] == 4
