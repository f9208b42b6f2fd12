"""The `imagegen` command line against a real server: outputs, saved files, and exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from client import cli
from client._output import Progress
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from tests.conftest import TEST_TOKEN, test_settings
from tests.helpers import finished

REPO = Path(__file__).resolve().parents[1]


async def imagegen(*argv: str, env: Mapping[str, str] | None = None) -> int:
    """Run `imagegen ARGV` in-process; in a thread, because main() runs its own event loop."""
    return await asyncio.to_thread(cli.main, list(argv), env={} if env is None else env)


def read_json(text: str) -> Any:
    return json.loads(text)


async def test_three_story_variants_from_the_installed_command(app: App, tmp_path: Path) -> None:
    """The issue's "done when": one command, progress while it runs, three 1080x1920 images saved."""
    out = tmp_path / "out"
    env = {**os.environ, "IMAGEGEN_ADDRESS": app.grpc_target}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        "--json",
        "generate",
        "a red fox in the snow, product shot",
        "--size",
        "1080x1920",
        "--variants",
        "3",
        "--out",
        str(out),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()

    progress = stderr.decode()
    assert "submitted job" in progress and "processing" in progress and "completed" in progress
    result = json.loads(stdout)
    job = result["job"]
    assert job["status"] == "JOB_STATUS_COMPLETED"
    files = [Path(path) for path in result["files"]]
    assert sorted(path.name for path in out.iterdir()) == [f"{job['id']}-{n}.png" for n in (1, 2, 3)]
    assert sorted(files) == sorted(out.iterdir())
    for path, image in zip(files, job["images"], strict=True):
        body = path.read_bytes()
        assert len(body) == int(image["size_bytes"])
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
        decoded = Image.open(io.BytesIO(body))
        assert decoded.format == "PNG" and decoded.size == (1080, 1920)


async def test_generate_shows_progress_per_event_and_saves_jpegs(app: App, tmp_path: Path, capsys) -> None:
    code = await imagegen(
        "--address",
        app.grpc_target,
        "generate",
        "a poster [sandbox:rate-limited]",
        "--size",
        "720x1280",
        "--variants",
        "2",
        "--format",
        "jpeg",
        "--folder",
        "stories",
        "--seed",
        "7",
        "--option",
        "safety_tolerance=3",
        "--label",
        "campaign=spring",
        "--out",
        str(tmp_path / "jpegs"),
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err

    lines = captured.err.splitlines()
    assert lines[0].startswith("submitted job ")
    # not a terminal: one line per event, with status, attempt, elapsed time and the retry's reason
    retry = next(line for line in lines if "retrying in" in line)
    assert " pending " in retry and "attempt 1" in retry and "HTTP 429" in retry
    assert "completed" in lines[-1] and "attempt 2" in lines[-1]

    saved = sorted((tmp_path / "jpegs").iterdir())
    assert [path.suffix for path in saved] == [".jpg", ".jpg"]
    assert all(str(path) in captured.out for path in saved)
    for path in saved:
        with Image.open(path) as decoded:
            assert decoded.format == "JPEG" and decoded.size == (720, 1280)


async def test_no_wait_prints_the_id_then_watch_get_and_jobs(app: App, tmp_path: Path, capsys) -> None:
    assert (
        await imagegen(
            "--address",
            app.grpc_target,
            "generate",
            "a quiet lake",
            "--size",
            "256x256",
            "--no-wait",
            "--folder",
            "lakes",
            "--request-id",
            "lake-1",
        )
        == 0
    )
    job_id = capsys.readouterr().out.strip()
    assert str(uuid.UUID(job_id)) == job_id

    assert await imagegen("--address", app.grpc_target, "watch", job_id, "--out", str(tmp_path)) == 0
    watched = capsys.readouterr()
    assert f"job {job_id}: done: 1 image 256x256 by flux-2-pro" in watched.out
    assert (tmp_path / f"{job_id}-1.png").is_file()

    assert await imagegen("get", job_id, "--address", app.grpc_target, "--json") == 0
    assert read_json(capsys.readouterr().out)["request_id"] == "lake-1"
    assert await imagegen("get", job_id, "--address", app.grpc_target) == 0
    assert "served by  flux-2-pro" in capsys.readouterr().out

    assert (
        await imagegen("--address", app.grpc_target, "jobs", "--folder", "lakes", "--status", "completed")
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ID", "STATUS", "PROVIDER", "SIZE"]
    assert len(table) == 2 and table[1].startswith(job_id) and "completed" in table[1] and "lakes" in table[1]

    assert await imagegen("--address", app.grpc_target, "jobs", "--status", "failed", "--json") == 0
    assert read_json(capsys.readouterr().out) == []


async def test_a_failed_job_exits_1_with_its_reason(app: App, tmp_path: Path, capsys) -> None:
    code = await imagegen(
        "--address",
        app.grpc_target,
        "generate",
        "a scene [sandbox:moderated]",
        "--size",
        "256x256",
        "--out",
        str(tmp_path / "none"),
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_JOB_FAILED
    assert "failed: CONTENT_MODERATED" in captured.out
    assert not (tmp_path / "none").exists()


async def test_invalid_input_exits_2(app: App, capsys) -> None:
    code = await imagegen(
        "--address", app.grpc_target, "generate", "", "--size", "100x1920", "--variants", "9"
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_INVALID
    assert "INVALID_ARGUMENT" in captured.err
    for field in ("prompt:", "width:", "num_variants:"):
        assert f"  {field}" in captured.err

    assert await imagegen("--address", app.grpc_target, "--json", "estimate", "x", "--option", "nope=1") == 2
    error = read_json(capsys.readouterr().err)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "provider_options.nope" in error["field_violations"]

    # usage errors never reach the server
    assert await imagegen("generate", "x", "--size", "wide") == cli.EXIT_INVALID
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err
    assert await imagegen("frobnicate") == cli.EXIT_INVALID
    capsys.readouterr()

    # NOT_FOUND and FAILED_PRECONDITION are the caller's mistakes too
    assert await imagegen("--address", app.grpc_target, "get", str(uuid.uuid4())) == cli.EXIT_INVALID
    assert "NOT_FOUND" in capsys.readouterr().err
    assert await imagegen("--address", app.grpc_target, "watch", str(uuid.uuid4())) == cli.EXIT_INVALID
    assert "NOT_FOUND" in capsys.readouterr().err
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="done soon", width=256, height=256))
        await finished(stub, job.id)
    assert await imagegen("--address", app.grpc_target, "cancel", job.id) == cli.EXIT_INVALID
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


async def test_unreachable_server_exits_3(capsys) -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(None)  # its port is now closed
    # --timeout bounds the whole call, retries included
    assert await imagegen("providers", "--timeout", "1", env={"IMAGEGEN_ADDRESS": f"127.0.0.1:{port}"}) == 3
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and f"127.0.0.1:{port}" in err


async def test_estimate_quotes_without_creating_a_job(app: App, capsys) -> None:
    assert (
        await imagegen(
            "--address", app.grpc_target, "estimate", "a banner", "--size", "1080x1920", "--variants", "3"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "flux_2_pro" in out and "1080x1920" in out and "$0.135" in out

    assert (
        await imagegen(
            "--address",
            app.grpc_target,
            "--json",
            "estimate",
            "a banner",
            "--size",
            "1080x1920",
            "--variants",
            "3",
        )
        == 0
    )
    quote = read_json(capsys.readouterr().out)
    assert quote["estimated_cost_usd_micros"] == "135000" and quote["id"] == ""

    assert await imagegen("--address", app.grpc_target, "jobs") == 0
    assert capsys.readouterr().out.strip() == "no jobs"


async def test_generate_on_a_retired_seed_id_shows_the_model_that_served_it(
    app: App, tmp_path: Path, capsys
) -> None:
    code = await imagegen(
        "--address", app.grpc_target, "generate", "SALE 50%", "--provider", "gpt_image_1_5",
        "--size", "256x256", "--out", str(tmp_path),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert "by gpt-image-2.6-sunburst" in captured.out + captured.err


async def test_generate_with_a_fallback_shows_the_model_that_served_it(
    app: App, tmp_path: Path, capsys
) -> None:
    code = await imagegen(
        "--address", app.grpc_target, "generate", "a kite [sandbox:no-credits@bfl]",
        "--fallback", "seedream_4", "--size", "256x256", "--out", str(tmp_path),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert "by seedream-4-0-250828 (fallback seedream_4)" in captured.out + captured.err


async def test_providers_table_and_json(app: App, capsys) -> None:
    assert await imagegen("--address", app.grpc_target, "providers") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "READY"]
    flux = next(line for line in table if line.startswith("flux_2_pro"))
    assert " yes " in flux and "256-2048" in flux and "$0.03" in flux
    assert " flux-2-pro " in flux and " active " in flux
    # a seed id whose vendor model is gone: the live model serving it, and why
    gpt = next(line for line in table if line.startswith("gpt_image_1_5 "))
    assert " gpt-image-2.6-sunburst " in gpt and "retired 2026-12-01, alias of gpt_image_2_6" in gpt

    assert await imagegen("--address", app.grpc_target, "providers", "--json") == 0
    catalog = {p["id"]: p for p in read_json(capsys.readouterr().out)}
    assert catalog["flux_2_pro"]["configured"] is True and catalog["flux_2_pro"]["max_variants"] >= 3
    assert catalog["nano_banana"]["served_model"] == "gemini-3.1-flash-image"


async def test_account_from_the_environment_and_cancel(tmp_path: Path, database_url: str, capsys) -> None:
    settings = test_settings(tmp_path, database_url, role="api", secured=True)  # jobs stay pending
    async with running_app(settings) as app:
        env = {"IMAGEGEN_ADDRESS": app.grpc_target, "IMAGEGEN_ACCOUNT": "acme", "IMAGEGEN_TOKEN": TEST_TOKEN}
        assert await imagegen("--json", "generate", "acme's job", "--no-wait", env=env) == 0
        job = read_json(capsys.readouterr().out)
        assert job["account_id"] == "acme" and job["status"] == "JOB_STATUS_PENDING"

        assert await imagegen("cancel", job["id"], "--account", "someone-else", env=env) == cli.EXIT_INVALID
        capsys.readouterr()
        assert await imagegen("cancel", job["id"], env=env) == 0
        assert capsys.readouterr().out.strip() == f"{job['id']}  cancelled"

        assert await imagegen("watch", job["id"], env=env) == cli.EXIT_JOB_FAILED  # cancelled is not success
        assert f"job {job['id']}: cancelled" in capsys.readouterr().out


async def test_help_documents_the_exit_codes_and_environment(capsys) -> None:
    assert await imagegen("--help") == 0
    text = capsys.readouterr().out
    needles = ("exit codes:", "IMAGEGEN_ADDRESS", "IMAGEGEN_TOKEN", "IMAGEGEN_ACCOUNT", "  3    the server")
    for needle in needles:
        assert needle in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_progress_redraws_one_line_per_job_and_keeps_retry_reasons() -> None:
    screen = _Terminal()
    progress = Progress(screen, clock=lambda: 1_000.0)
    created = pb.Job(id="11111111-aaaa", status=pb.JOB_STATUS_PENDING)
    created.create_time.FromSeconds(990)
    other = pb.Job(id="22222222-bbbb", status=pb.JOB_STATUS_PENDING)
    progress.add(created)
    progress.add(other)

    retrying = pb.Job()
    retrying.CopyFrom(created)
    retrying.status, retrying.attempt = pb.JOB_STATUS_PENDING, 1
    progress.update(
        pb.JobEvent(
            job=retrying,
            previous_status=pb.JOB_STATUS_PROCESSING,
            version=3,
            kind=pb.JOB_EVENT_KIND_TRANSITION,
            message="retrying in 1.2 s after: BFL answered HTTP 429 (attempt 2 of 4)",
        )
    )
    drawn = screen.getvalue()
    last_frame = drawn.rsplit("\x1b[2F", 1)[1]  # the cursor went back up over the two job lines
    assert "11111111  retry 1: retrying in 1.2 s after: BFL answered HTTP 429 (attempt 2 of 4)" in last_frame
    assert "11111111  pending     attempt 1   10.0s  1 retry" in last_frame
    assert "22222222  pending" in last_frame


async def test_ttl_and_delete(app: App, capsys) -> None:
    address = ("--address", app.grpc_target)
    assert await imagegen(*address, "generate", "brief", "--size", "256x256", "--ttl", "2h", "--no-wait") == 0
    job_id = capsys.readouterr().out.strip()
    assert await imagegen(*address, "watch", job_id) == 0
    capsys.readouterr()
    assert await imagegen(*address, "get", job_id, "--json") == 0
    job = read_json(capsys.readouterr().out)
    assert job["status"] == "JOB_STATUS_COMPLETED" and job["expire_time"] > job["create_time"], job
    assert await imagegen(*address, "get", job_id) == 0
    assert "expires" in capsys.readouterr().out

    assert await imagegen(*address, "delete", job_id) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}  deleted"
    assert await imagegen(*address, "get", job_id) == 2  # NOT_FOUND now
    assert await imagegen(*address, "generate", "x", "--ttl", "soon") == 2  # a usage error
    assert "expected a duration" in capsys.readouterr().err
