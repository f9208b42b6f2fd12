"""The composition root: the one place concrete classes are chosen and every resource's lifetime is owned."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.base import ImageProvider
from providers.catalog import CATALOG
from providers.references import PublicOnlyConnector, parse_networks
from providers.vendors import VENDORS
from sandbox import Sandbox
from server.auth import LOCAL_ACCOUNT, Authenticator
from server.files import UrlSigner, signing_key
from server.health import SERVICE_NAME, Readiness
from server.http import http_routes
from server.hub import EventHub
from server.metrics import GrpcMetrics, QueueSampler, ServiceMetrics
from server.reaper import Reaper
from server.reflection import SERVICE_NAMES as REFLECTION_SERVICES
from server.reflection import add_reflection
from server.servicer import Admission, ImageGenerationServicer
from server.settings import Settings, split_address
from server.worker import Worker, WorkerPolicy
from storage import migrate
from storage.blobs import LocalBlobStore
from storage.db import is_postgres, make_engine
from storage.jobs import SqlJobStore
from storage.listener import PgListener
from storage.port import ConcurrencyCap, JobStore

log = logging.getLogger(__name__)

#: gRPC core refuses new calls past this many pending ones; watch-heavy servers need far more than 1,000
MAX_PENDING_REQUESTS = 20_000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class App:
    """A running service: what tests and the entry point need to reach."""

    settings: Settings
    grpc_port: int
    http_port: int
    store: JobStore
    hub: EventHub
    worker: Worker | None
    registry: CollectorRegistry
    sandbox: Sandbox | None
    providers: Mapping[str, ImageProvider]
    readiness: Readiness

    @property
    def grpc_target(self) -> str:
        """Where a client dials the gRPC API."""
        host, _ = split_address(self.settings.grpc_address)
        return f"{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """The base URL of the HTTP side."""
        host, _ = split_address(self.settings.http_address)
        return f"http://{host}:{self.http_port}"


def build_providers(
    settings: Settings,
    session_for: Callable[[str], aiohttp.ClientSession],
    sandbox: Sandbox | None,
    references: aiohttp.ClientSession | None = None,
) -> dict[str, ImageProvider]:
    """An adapter per model: the vendor's real API when its key is set, else the sandbox (when running)."""
    providers: dict[str, ImageProvider] = {}
    for vendor, info in VENDORS.items():
        configured = settings.vendor(vendor)
        # vendors that take reference images inline download them, through the guarded session
        extra: dict[str, Any] = (
            {"references_session": references} if info.inline_references and references else {}
        )
        if info.polls:
            extra["poll_interval_s"] = settings.bfl_poll_interval_s
            extra["max_polls_per_s"] = settings.bfl_max_polls_per_s
        if configured.api_key:
            adapter = info.adapter(
                session_for(vendor),
                base_url=configured.base_url or info.production_url,
                api_key=configured.api_key,
                **extra,
            )
        elif sandbox is not None:
            adapter = info.adapter(
                session_for(vendor),
                base_url=configured.base_url or sandbox.base_url,
                api_key="sandbox",
                **extra,
            )
        else:
            continue
        for model in CATALOG.values():
            if model.vendor == vendor:
                providers[model.id] = adapter
    return providers


def vendor_caps(settings: Settings) -> tuple[ConcurrencyCap, ...]:
    """IMAGEGEN_VENDOR_CONCURRENCY as claim-time caps over each vendor's models."""
    return tuple(
        ConcurrencyCap(
            name=vendor,
            max_tasks=limit,
            providers=frozenset(model.id for model in CATALOG.values() if model.vendor == vendor),
        )
        for vendor, limit in settings.vendor_caps().items()
    )


def needs_sandbox(settings: Settings) -> bool:
    """Whether some vendor has no key and the sandbox should stand in for it."""
    return settings.sandbox == "auto" and any(not settings.vendor(vendor).api_key for vendor in VENDORS)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, providers: Mapping[str, ImageProvider] | None = None, migrate_schema: bool = False
) -> AsyncIterator[App]:
    """Start everything the settings ask for; stop it all, in order, when the block exits."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert settings.blob_dir is not None
    if settings.auth_tokens_file is not None:
        authenticator = Authenticator.from_file(settings.auth_tokens_file)
    else:
        authenticator = Authenticator.local()
        log.warning(
            "LOCAL MODE: no IMAGEGEN_AUTH_TOKENS_FILE, so every call acts for the account %r and the "
            "server listens on loopback only",
            LOCAL_ACCOUNT,
        )
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    metrics.initialise(CATALOG)
    engine = make_engine(
        settings.database_url, pool_size=settings.db_pool_size, statement_timeout_s=settings.db_timeout_s
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        if migrate_schema:
            await migrate.upgrade(engine)
        store = SqlJobStore(engine)
        stack.push_async_callback(store.close)  # before the engine is disposed of: its writers' connections
        blobs = LocalBlobStore(settings.blob_dir)
        # Bind the HTTP port first: with port 0 the image URLs must name the port actually bound.
        http_host, http_port = split_address(settings.http_address)
        http_socket = stack.enter_context(
            socket.create_server(
                (http_host, http_port), family=socket.AF_INET6 if ":" in http_host else socket.AF_INET
            )
        )
        bound_http_port = http_socket.getsockname()[1]
        public_base_url = settings.public_base_url or f"http://{_url_host(http_host)}:{bound_http_port}"
        signer = UrlSigner(
            signing_key(settings.url_signing_key, settings.data_dir),
            base_url=public_base_url,
            ttl_s=settings.url_ttl_s,
        )

        sandbox: Sandbox | None = None
        if providers is None and needs_sandbox(settings):
            port = settings.sandbox_port
            sandbox = await stack.enter_async_context(
                Sandbox.running(
                    port=port, cluster_port=port + 1 if port else 0, latency_s=settings.sandbox_latency_s
                )
            )
            missing = [vendor for vendor in VENDORS if not settings.vendor(vendor).api_key]
            log.warning(
                "no API key for %s: serving them from the local SANDBOX at %s; their images are "
                "placeholders, "
                "not real generations",
                ", ".join(missing),
                sandbox.base_url,
            )
        # One connection pool for every vendor; a session per vendor only so that each request's metrics
        # carry its vendor's name.
        connector = aiohttp.TCPConnector(limit=max(100, 2 * settings.worker_concurrency), limit_per_host=0)
        stack.push_async_callback(connector.close)
        timeout = aiohttp.ClientTimeout(total=settings.provider_timeout_s, connect=10)

        def session_for(vendor: str) -> aiohttp.ClientSession:
            session = aiohttp.ClientSession(
                connector=connector,
                connector_owner=False,
                timeout=timeout,
                trace_configs=[metrics.trace_config(vendor)],
            )
            stack.push_async_callback(session.close)
            return session

        # Callers' reference URLs get their own pool, whose connector refuses non-public addresses.
        reference_connector = PublicOnlyConnector(
            allow=parse_networks(settings.reference_allow_networks), limit=100
        )
        stack.push_async_callback(reference_connector.close)
        references = aiohttp.ClientSession(
            connector=reference_connector,
            timeout=aiohttp.ClientTimeout(total=60),
            trace_configs=[metrics.trace_config("references")],
        )
        stack.push_async_callback(references.close)
        if providers is None:
            providers = build_providers(settings, session_for, sandbox, references)

        worker: Worker | None = None
        if settings.role in ("all", "worker"):
            worker = Worker(
                store,
                blobs,
                providers,
                metrics,
                policy=WorkerPolicy(
                    concurrency=settings.worker_concurrency,
                    lease_s=settings.lease_s,
                    poll_interval_s=settings.poll_interval_s,
                    max_attempts=settings.max_attempts,
                    retry_base_s=settings.retry_base_s,
                    retry_max_s=settings.retry_max_s,
                    caps=vendor_caps(settings),
                    per_account=settings.max_in_flight_per_account,
                ),
            )
        hub = EventHub(
            store,
            poll_interval_s=settings.poll_interval_s,
            heartbeat_s=settings.watch_heartbeat_s,
            on_notices=worker.observe if worker is not None else None,
        )
        store.set_on_commit(hub.notify)
        hub.start()
        stack.push_async_callback(hub.close)

        if is_postgres(engine):
            listener = PgListener(
                settings.database_url,
                on_notices=hub.notify,
                on_reconnect=hub.request_catch_up,
                wanted=hub.wants_notices,
                connect_timeout_s=settings.db_timeout_s,
            )
            await listener.start()
            stack.push_async_callback(listener.close)

        health_servicer = health.aio.HealthServicer()
        readiness = Readiness(store, health_servicer, on_change=metrics.database_up.set)
        await readiness.check()
        sampler = QueueSampler(store, metrics, interval_s=max(1.0, settings.poll_interval_s))
        reaper = Reaper(store, metrics, interval_s=max(0.5, settings.lease_s / 3), blobs=blobs)
        for background in (readiness.run(), sampler.run(), reaper.run()):
            task = asyncio.create_task(background)
            stack.callback(task.cancel)

        server = grpc.aio.server(
            options=[
                ("grpc.max_pending_requests", MAX_PENDING_REQUESTS),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=None,
        )
        registrar = _Registrar(server, GrpcMetrics(registry))
        services = [health.SERVICE_NAME, *REFLECTION_SERVICES]
        if settings.role in ("all", "api"):
            pb_grpc.add_ImageGenerationServicer_to_server(
                ImageGenerationServicer(
                    store,
                    hub,
                    signer,
                    providers,
                    metrics,
                    reference_allow=parse_networks(settings.reference_allow_networks),
                    deadline_s=settings.job_deadline_s,
                    auth=authenticator,
                    max_watch_streams_per_caller=settings.max_watch_streams_per_caller,
                    blobs=blobs,
                    admission=Admission(
                        max_pending=settings.max_pending_jobs,
                        max_pending_per_account=settings.max_pending_jobs_per_account,
                        max_submits_per_minute=settings.max_submits_per_minute_per_account,
                        pending_estimate=lambda: sampler.pending,
                    ),
                ),
                registrar,
            )
            services.append(SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
        add_reflection(services, registrar)
        grpc_port = _listen(server, settings)
        if grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {settings.grpc_address}")

        http_runner = web.AppRunner(_http_app(registry, readiness, blobs, signer), access_log=None)
        await http_runner.setup()
        stack.push_async_callback(http_runner.cleanup)
        await web.SockSite(http_runner, http_socket).start()

        await server.start()
        if worker is not None:
            worker.start()
        app = App(
            settings=settings,
            grpc_port=grpc_port,
            http_port=bound_http_port,
            store=store,
            hub=hub,
            worker=worker,
            registry=registry,
            sandbox=sandbox,
            providers=providers,
            readiness=readiness,
        )
        log.info(
            "serving gRPC on %s and HTTP on %s (role %s, database %s)",
            app.grpc_target,
            app.http_url,
            settings.role,
            engine.url.render_as_string(hide_password=True),
            extra={"grpc_target": app.grpc_target, "http_url": app.http_url, "role": settings.role},
        )
        try:
            yield app
        finally:
            # Graceful order: stop advertising, end watch streams (clients resume elsewhere), stop taking
            # calls while in-flight unary calls finish, then let running jobs finish or hand them back.
            await readiness.shutting_down()
            await hub.close()
            await server.stop(settings.shutdown_grace_s)
            if worker is not None:
                await worker.stop(settings.shutdown_grace_s)


def freeze_startup_heap() -> None:
    """Put what the process built at start-up out of the cyclic collector's sight, for good.

    For a process that serves until it stops: modules, the gRPC server, pools and caches live as long as
    it does, yet every full collection scanned them again, and under load those collections paused the
    event loop 57 to 86 ms (measured in the submit benchmark, where they set the p99 at half the maximum
    rate). Frozen, they are skipped; reference counting still frees them. Not for tests, which start
    many apps in one process and need theirs collected.
    """
    gc.collect()
    gc.freeze()


class _Registrar:
    """A gRPC server to the generated `add_*_to_server` functions: their handlers become generic ones
    only, each with the grpc_server_* metrics.

    grpc.aio accepts each call of a *registered* method through `asyncio.wait` over one outstanding
    request per registered method (and one for the rest), each re-armed after its call: the cost of
    accepting every call grows with the methods registered. As generic handlers the same handlers
    are found by name, and every call is accepted through a single outstanding request. With this
    server's 11 (its own, health's and reflection's), counted with callgrind over 2,000 submits, the
    server process spent 1,349k instructions per submit registered and 1,282k generic; two callgrind runs
    of one version later differed by 4% (its batches are smaller than at saturation; see README), so
    the count is a sign of the saving rather than its size. The echo alone counted 524k and 484k.
    """

    def __init__(self, server: grpc.aio.Server, metrics: GrpcMetrics) -> None:
        self._server = server
        self._metrics = metrics

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([self._metrics.measured(handler) for handler in handlers])

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """The generated code also passes its handlers here; they are already in its generic handler."""


def _http_app(
    registry: CollectorRegistry, readiness: Readiness, blobs: LocalBlobStore, signer: UrlSigner
) -> web.Application:
    app = web.Application()
    app.add_routes(http_routes(registry, readiness, blobs, signer))
    return app


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind the gRPC port, with TLS (and client certificates) when configured; returns the bound port."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(settings.grpc_address)
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(settings.grpc_address, credentials)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
