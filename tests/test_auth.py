"""Callers, tokens, accounts, local mode, TLS: nobody reaches another account's jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from server.app import App, running_app
from server.auth import AuthConfigError, Authenticator, token_digest
from tests.conftest import ACME_TOKEN, TEST_TOKEN, authed_channel, test_settings
from tests.helpers import bad_fields, events_until_end, finished

ROOT = Path(__file__).resolve().parent.parent


def _metadata(token: str | None, account: str | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    if token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    if account is not None:
        pairs.append(("x-account-id", account))
    return tuple(pairs)


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_tokens_decide_who_may_act_for_which_account(secured_app: App) -> None:
    async with grpc.aio.insecure_channel(secured_app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        request = pb.GenerateImageRequest(prompt="x", validate_only=True)
        cases = [
            (None, "acme", grpc.StatusCode.UNAUTHENTICATED),  # no token
            ("not-a-token", "acme", grpc.StatusCode.UNAUTHENTICATED),  # unknown token
            (ACME_TOKEN, "globex", grpc.StatusCode.PERMISSION_DENIED),  # not its account
            (ACME_TOKEN, "acme", grpc.StatusCode.OK),
            (ACME_TOKEN, None, grpc.StatusCode.OK),  # its only account is implied
            (TEST_TOKEN, "globex", grpc.StatusCode.OK),  # "*" may act for any account
            (TEST_TOKEN, None, grpc.StatusCode.INVALID_ARGUMENT),  # several accounts: it must say which
            (TEST_TOKEN, "../etc", grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for token, account, expected in cases:
            code = await _code(stub.GenerateImage(request, metadata=_metadata(token, account)))
            assert code == expected, (token, account)
        acme = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="x"), metadata=_metadata(ACME_TOKEN, None)
        )
        assert acme.account_id == "acme"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(request, metadata=(("authorization", f"Basic {TEST_TOKEN}"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(pb.ListJobsRequest(), metadata=_metadata(TEST_TOKEN, None))
        assert set(bad_fields(caught.value)) == {"x-account-id"}


async def test_no_rpc_reaches_another_accounts_job(secured_app: App) -> None:
    async with (
        authed_channel(secured_app.grpc_target, ACME_TOKEN, "acme") as acme_channel,
        authed_channel(secured_app.grpc_target, TEST_TOKEN, "globex") as globex_channel,
    ):
        acme = pb_grpc.ImageGenerationStub(acme_channel)
        globex = pb_grpc.ImageGenerationStub(globex_channel)
        job = await acme.GenerateImage(
            pb.GenerateImageRequest(prompt="acme's secret product", width=256, height=256, folder_id="launch")
        )
        done = await finished(acme, job.id)

        for call in (
            globex.GetJob(pb.GetJobRequest(job_id=job.id)),
            globex.CancelJob(pb.CancelJobRequest(job_id=job.id)),
        ):
            assert await _code(call) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await events_until_end(globex, job.id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert list((await globex.ListJobs(pb.ListJobsRequest())).jobs) == []
        assert list((await globex.ListJobs(pb.ListJobsRequest(folder_id="launch"))).jobs) == []

        # globex's WatchJobs sees none of acme's events
        stream = globex.WatchJobs(pb.WatchJobsRequest())
        await stream.initial_metadata()
        other = await acme.GenerateImage(pb.GenerateImageRequest(prompt="more", width=256, height=256))
        await finished(acme, other.id)
        mine = await globex.GenerateImage(pb.GenerateImageRequest(prompt="globex's", width=256, height=256))
        async with asyncio.timeout(10):
            first = await stream.read()
        assert first.job.id == mine.id and first.job.account_id == "globex"
        stream.cancel()

        # an image URL is good for its own key only: pointing it at another account's path breaks it
        url = done.images[0].url
        assert "/files/acme/launch/" in url
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert response.status == 200
            async with http.get(url.replace("/files/acme/", "/files/globex/")) as response:
                assert response.status == 403


async def test_local_mode_serves_only_the_default_account(app: App) -> None:
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", validate_only=True))
        assert job.account_id == "default"
        same = await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="x", validate_only=True), metadata=(("x-account-id", "default"),)
        )
        assert same.account_id == "default"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(pb.ListJobsRequest(), metadata=(("x-account-id", "acme"),))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "local mode" in caught.value.details()


async def test_tokens_never_reach_the_logs(secured_app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with authed_channel(secured_app.grpc_target) as channel:
        stub = pb_grpc.ImageGenerationStub(channel)
        job = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x", width=256, height=256))
        await finished(stub, job.id)
        await _code(stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=_metadata("wrong-token", "a")))
    text = "\n".join(record.getMessage() + repr(vars(record)) for record in caplog.records)
    assert TEST_TOKEN not in text and "wrong-token" not in text
    assert "api_key" not in repr(secured_app.settings.vendor("bfl"))


def test_tokens_file_is_checked_and_the_token_command_writes_entries(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "server", "token", "--name", "ads", "--accounts", "acme,globex"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = made.stdout.split(": ", 1)[1].splitlines()[0].strip()
    entry = json.loads(made.stdout.strip().splitlines()[-1])
    assert entry == {"name": "ads", "token_sha256": token_digest(token), "accounts": ["acme", "globex"]}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"callers": [entry]}))
    auth = Authenticator.from_file(path)
    assert auth.account([("authorization", f"Bearer {token}"), ("x-account-id", "globex")]) == "globex"

    for broken in (
        '{"callers": [{"name": "x", "token_sha256": "short", "accounts": "*"}]}',
        '{"callers": [{"name": "x", "token_sha256": "' + "a" * 64 + '", "accounts": []}]}',
        "not json",
        '{"people": []}',
    ):
        path.write_text(broken)
        with pytest.raises(AuthConfigError):
            Authenticator.from_file(path)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


async def test_mutual_tls(certificates: Path, tmp_path: Path, database_url: str) -> None:
    d = certificates
    settings = test_settings(
        tmp_path,
        database_url,
        tls_cert_file=d / "server.pem",
        tls_key_file=d / "server.key",
        tls_client_ca_file=d / "ca.pem",
    )
    async with running_app(settings) as app:
        with_client_cert = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(app.grpc_target, with_client_cert) as channel:
            reply = await pb_grpc.ImageGenerationStub(channel).ListProviders(
                pb.ListProvidersRequest(), timeout=10
            )
            assert len(reply.providers) == 6
        without_client_cert = grpc.ssl_channel_credentials(root_certificates=(d / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(app.grpc_target, without_client_cert) as channel:
            code = await _code(
                pb_grpc.ImageGenerationStub(channel).ListProviders(pb.ListProvidersRequest(), timeout=5)
            )
            assert code == grpc.StatusCode.UNAVAILABLE  # the handshake is refused
        async with grpc.aio.insecure_channel(app.grpc_target) as channel:
            code = await _code(
                pb_grpc.ImageGenerationStub(channel).ListProviders(pb.ListProvidersRequest(), timeout=5)
            )
            assert code == grpc.StatusCode.UNAVAILABLE  # plaintext is not spoken
