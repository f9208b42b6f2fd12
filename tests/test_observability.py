"""Metrics after a run of mixed jobs, checked by our parser, by promtool, and by a real Prometheus scrape.

promtool and prometheus come from Debian's `prometheus` package, which `make test` / `.ci/run` install.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App
from tests.helpers import eventually, finished, first_event_with_status

OPERATIONS = Path(__file__).resolve().parent.parent / "server" / "operations"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make test` installs Debian's prometheus package, which provides it")
    return path


async def _scrape(app: App) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{app.http_url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def _samples(exposition: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.fixture
async def mixed_run(app: App) -> AsyncIterator[tuple[App, str]]:
    """Completed, retried, moderated and cancelled jobs, and one rejected request; then the exposition."""
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        plain = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a fox", width=256, height=256))
        retried = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a fox [sandbox:rate-limited]", width=256, height=256)
        )
        moderated = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a fox [sandbox:moderated]", width=256, height=256)
        )
        slow = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a fox [sandbox:slow=30]", width=256, height=256)
        )
        stream = stub.WatchJob(pb.WatchJobRequest(job_id=slow.id))
        await first_event_with_status(stream, pb.JOB_STATUS_PROCESSING)

        async def every_job_submitted() -> bool:
            # PROCESSING comes before the vendor submit: cancel only once BFL has taken all four tasks
            submits = {"vendor": "bfl", "endpoint": "submit", "outcome": "2xx"}
            return _value(_samples(await _scrape(app)), "imagegen_provider_requests_total", **submits) >= 4

        await eventually(every_job_submitted, timeout=20)
        # the watcher goes first: after CancelJob the stream could end by itself, with OK, before it
        stream.cancel()
        await stub.CancelJob(pb.CancelJobRequest(job_id=slow.id))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt=""))
        for job in (plain, retried, moderated):
            await finished(stub, job.id)
        assert app.worker is not None
        worker = app.worker
        await eventually(lambda: not worker.in_flight)
        # the queue gauges come from the database; read them now rather than waiting for the sampler
        from server.metrics import QueueSampler

        await QueueSampler(app.store, _metrics_of(app), interval_s=1).sample()
        yield app, await _scrape(app)


def _metrics_of(app: App):
    assert app.worker is not None
    return app.worker._metrics  # the one ServiceMetrics of this app


async def test_metrics_move_as_the_jobs_did(mixed_run: tuple[App, str]) -> None:
    _app, exposition = mixed_run
    samples = _samples(exposition)
    flux = {"provider": "flux_2_pro"}

    assert _value(samples, "imagegen_jobs_submitted_total", **flux) == 4
    assert _value(samples, "imagegen_jobs_finished_total", status="completed", **flux) == 2
    assert (
        _value(samples, "imagegen_jobs_finished_total", status="failed", code="CONTENT_MODERATED", **flux)
        == 1
    )
    assert _value(samples, "imagegen_jobs_finished_total", status="cancelled", **flux) == 1
    assert _value(samples, "imagegen_job_retries_total", reason="rate_limited", **flux) == 1
    assert _value(samples, "imagegen_job_attempts_started_total", **flux) == 5  # retried job ran twice
    # two completed 256x256 jobs at 3 credits each; moderated and cancelled jobs are free
    assert _value(samples, "imagegen_cost_usd_total", **flux) == pytest.approx(0.06)
    assert _value(samples, "imagegen_job_run_seconds_count", status="completed", **flux) == 2
    assert _value(samples, "imagegen_job_queue_wait_seconds_count", **flux) == 5
    assert _value(samples, "imagegen_jobs_in_flight", **flux) == 0
    assert _value(samples, "imagegen_jobs_pending") == 0
    assert _value(samples, "imagegen_oldest_pending_job_age_seconds") == 0
    assert _value(samples, "imagegen_database_up") == 1
    assert _value(samples, "imagegen_watch_streams") == 0
    assert _value(samples, "imagegen_lease_takeovers_total") == 0

    # vendor HTTP, as the adapter spoke it: one throttled submit, successful submits, polls, downloads
    assert (
        _value(samples, "imagegen_provider_requests_total", vendor="bfl", endpoint="submit", outcome="429")
        == 1
    )
    assert (
        _value(samples, "imagegen_provider_requests_total", vendor="bfl", endpoint="submit", outcome="2xx")
        == 4
    )
    assert (
        _value(samples, "imagegen_provider_requests_total", vendor="bfl", endpoint="download", outcome="2xx")
        == 2
    )
    assert _value(samples, "imagegen_provider_response_bytes_total", vendor="bfl", endpoint="download") > 1000
    assert _value(samples, "imagegen_provider_request_seconds_count", vendor="bfl") >= 7

    # gRPC server metrics, under the ecosystem's names and code labels
    method = {
        "grpc_service": "imagegen.v1.ImageGeneration",
        "grpc_method": "GenerateImage",
        "grpc_type": "unary",
    }
    assert _value(samples, "grpc_server_started_total", **method) == 5
    assert _value(samples, "grpc_server_handled_total", grpc_code="OK", **method) == 4
    assert _value(samples, "grpc_server_handled_total", grpc_code="InvalidArgument", **method) == 1
    assert _value(samples, "grpc_server_handling_seconds_count", **method) == 5
    watch = {"grpc_method": "WatchJob", "grpc_type": "server_stream"}
    assert _value(samples, "grpc_server_handled_total", grpc_code="OK", **watch) == 3
    assert _value(samples, "grpc_server_handled_total", grpc_code="Canceled", **watch) == 1
    assert _value(samples, "grpc_server_msg_sent_total", **watch) >= 4  # at least a snapshot per stream
    assert _value(samples, "grpc_server_handling_seconds_count", grpc_method="WatchJob") == 0  # streams apart

    # no unbounded label values
    for (name, labels), _ in samples.items():
        for key, value in labels:
            assert not re.fullmatch(r"[0-9a-f-]{36}", value), (name, key, value)


async def test_promtool_accepts_the_exposition_and_the_rules(mixed_run: tuple[App, str]) -> None:
    _app, exposition = mixed_run
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", str(OPERATIONS / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 12 rules found" in rules.stdout


def test_promtool_unit_tests_of_the_model_alerts() -> None:
    # alerts_test.yml: the shutdown alert is quiet 30 days and 1 hour before a date, fires from 30 days (once
    # per provider, whatever the replicas), stays quiet for a far date; MODEL_UNAVAILABLE pages at once.
    tested = subprocess.run(
        [_tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=OPERATIONS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


async def test_rules_and_dashboard_only_use_exported_metrics(mixed_run: tuple[App, str]) -> None:
    _app, exposition = mixed_run
    exported = {sample for sample, _ in _samples(exposition)}
    # a gauge without samples (no model of the shipped catalog has a shutdown date) is still declared
    exported |= set(re.findall(r"^# TYPE (\S+) ", exposition, flags=re.M))
    dashboard = json.loads((OPERATIONS / "dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions.append((OPERATIONS / "alerts.yml").read_text())
    named = {
        name for text in expressions for name in re.findall(r"\b((?:imagegen|grpc_server)_[a-z_]+)\b", text)
    }
    assert named, "no metric names found"
    assert named <= exported, named - exported


async def test_a_real_prometheus_scrape_sees_the_values(mixed_run: tuple[App, str], tmp_path: Path) -> None:
    app, _ = mixed_run
    prometheus = _tool("prometheus")
    target = app.http_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{OPERATIONS / 'alerts.yml'}]\n"
        f"scrape_configs: [{{job_name: imagegen, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    # Prometheus cannot report a port it chose itself, so this one test picks a free port first.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def query(expr: str) -> list[dict]:  # type: ignore[type-arg]
                try:
                    async with http.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}
                    ) as reply:
                        return (await reply.json())["data"]["result"] if reply.status == 200 else []
                except aiohttp.ClientError:
                    return []

            async def scraped() -> bool:
                return bool(await query('imagegen_jobs_submitted_total{job="imagegen"}'))

            # Prometheus scrapes on its own clock: poll its API
            await eventually(scraped, timeout=30, interval=0.2)
            [up] = await query('up{job="imagegen"}')
            assert up["value"][1] == "1"
            [submitted] = await query('sum(imagegen_jobs_submitted_total{job="imagegen"})')
            assert submitted["value"][1] == "4"
            [moderated] = await query('sum(imagegen_jobs_finished_total{code="CONTENT_MODERATED"})')
            assert moderated["value"][1] == "1"
            [cost] = await query("sum(imagegen_cost_usd_total)")
            assert float(cost["value"][1]) == pytest.approx(0.06)
            [handled] = await query(
                'sum(grpc_server_handled_total{grpc_method="GenerateImage",grpc_code="OK"})'
            )
            assert handled["value"][1] == "4"
            async with http.get(f"http://127.0.0.1:{port}/api/v1/rules") as reply:
                groups = (await reply.json())["data"]["groups"]
            assert {rule["health"] for group in groups for rule in group["rules"]} == {"ok"}
    finally:
        process.terminate()
        await process.wait()
