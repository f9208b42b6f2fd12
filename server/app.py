"""The composition root: the one place concrete classes are chosen and every resource's lifetime is owned."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from imagegen.v1 import imagegen_pb2_grpc as pb_grpc
from providers.base import ImageProvider
from providers.catalog import SHIPPED_CATALOG_FILE, Catalog, load_catalog
from providers.references import PublicOnlyConnector, parse_networks
from providers.vendors import VENDORS, endpoint_of
from sandbox import Sandbox
from server import tracing
from server.auth import LOCAL_ACCOUNT, Authenticator
from server.blobs import MeasuredBlobStore, image_urls
from server.breakers import Breakers
from server.files import UrlSigner, signing_key
from server.health import SERVICE_NAME, Readiness
from server.http import http_routes
from server.hub import EventHub
from server.lifecycle import LifecycleWatcher
from server.metrics import GrpcMetrics, QueueSampler, ServiceMetrics
from server.reaper import Reaper
from server.reflection import SERVICE_NAMES as REFLECTION_SERVICES
from server.reflection import add_reflection
from server.servicer import Admission, ImageGenerationServicer
from server.settings import Settings, split_address
from server.sweeper import Sweeper
from server.webhooks import WebhookSender
from server.worker import Worker, WorkerPolicy
from storage import migrate
from storage.blobs import LocalBlobStore, S3Options, open_blob_store
from storage.breakers import BreakerPolicy, SqlBreakers
from storage.db import is_postgres, make_engine
from storage.errors import SchemaBehind, StorageError
from storage.jobs import SqlJobStore
from storage.listener import PgListener
from storage.models import utcnow
from storage.port import ConcurrencyCap, JobStore
from storage.retention import JobDeleter

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
    catalog: Catalog
    lifecycle: LifecycleWatcher | None = None
    breakers: Breakers | None = None

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
    catalog: Catalog | None = None,
) -> dict[str, ImageProvider]:
    """An adapter per product id: the vendor's real API when its key is set, else the sandbox, if running."""
    catalog = catalog or load_catalog(settings.catalog_file or SHIPPED_CATALOG_FILE)
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
        for product_id in catalog:
            if catalog.serving(product_id).vendor == vendor:
                providers[product_id] = adapter
    return providers


def vendor_caps(settings: Settings, catalog: Catalog | None = None) -> tuple[ConcurrencyCap, ...]:
    """IMAGEGEN_VENDOR_CONCURRENCY as claim-time caps over each vendor's models (aliases included).

    Without `catalog`, the one the settings name (the backlog command and the manifests' generator)."""
    catalog = catalog or load_catalog(settings.catalog_file or SHIPPED_CATALOG_FILE)
    return tuple(
        ConcurrencyCap(
            name=vendor,
            max_tasks=limit,
            providers=frozenset(pid for pid in catalog if catalog.serving(pid).vendor == vendor),
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
    # First: a bad catalog entry stops the server before anything listens (CatalogError names it).
    catalog = load_catalog(settings.catalog_file or SHIPPED_CATALOG_FILE)
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
    metrics.initialise(catalog)
    metrics.initialise_models({pid: catalog.serving(pid).vendor_model for pid in catalog})
    metrics.set_shutdown_dates(catalog.shutdown_dates())
    engine = make_engine(
        settings.database_url, pool_size=settings.db_pool_size, statement_timeout_s=settings.db_timeout_s
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        if settings.tracing:
            await stack.enter_async_context(tracing.running())
            tracing.instrument_engine(engine)
        if migrate_schema:
            await migrate.upgrade(engine)
        store = SqlJobStore(
            engine, linger_s=settings.group_commit_linger_s, saturated_share=settings.saturated_share
        )
        stack.push_async_callback(store.close)  # before the engine is disposed of: its writers' connections
        blobs = MeasuredBlobStore(open_blob_store(settings.blob_url, s3=s3_options(settings)), metrics)
        stack.push_async_callback(blobs.close)
        deleter = JobDeleter(engine, blobs)
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
        urls = image_urls(blobs, signer, settings.url_ttl_s)

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
                trace_configs=_trace_configs(metrics, settings, vendor),
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
            trace_configs=_trace_configs(metrics, settings, "references"),
        )
        stack.push_async_callback(references.close)
        if providers is None:
            providers = build_providers(settings, session_for, sandbox, references, catalog)

        breakers = Breakers(
            SqlBreakers(
                engine,
                BreakerPolicy(
                    failure_ratio=settings.breaker_failure_ratio,
                    min_requests=settings.breaker_min_requests,
                    window_s=settings.breaker_window_s,
                    cooldown_s=settings.breaker_cooldown_s,
                    probes=settings.breaker_probes,
                ),
            ),
            VENDORS,
            metrics,
            refresh_s=settings.breaker_refresh_s,
        )
        worker: Worker | None = None
        if settings.role in ("all", "worker"):
            worker = Worker(
                store,
                blobs,
                providers,
                metrics,
                catalog=catalog,
                breakers=breakers,
                policy=WorkerPolicy(
                    concurrency=settings.worker_concurrency,
                    lease_s=settings.lease_s,
                    poll_interval_s=settings.poll_interval_s,
                    max_attempts=settings.max_attempts,
                    retry_base_s=settings.retry_base_s,
                    retry_max_s=settings.retry_max_s,
                    caps=vendor_caps(settings, catalog),
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
        readiness = Readiness(
            store,
            health_servicer,
            on_change=metrics.database_up.set,
            blobs=blobs,
            on_blob_change=metrics.blob_store_up.set,
        )
        await readiness.check()
        sampler = QueueSampler(store, metrics, interval_s=max(1.0, settings.poll_interval_s))
        reaper = Reaper(store, metrics, interval_s=max(0.5, settings.lease_s / 3), blobs=blobs)
        sender = WebhookSender(
            store,
            metrics,
            owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            allow=parse_networks(settings.webhook_allow_networks),
            poll_interval_s=settings.poll_interval_s,
            timeout_s=settings.webhook_timeout_s,
            lease_s=settings.webhook_timeout_s + settings.lease_s,
            retry_hours=settings.webhook_retry_hours,
            retry_base_s=settings.webhook_retry_base_s,
        )
        retention = _prune_events(store, timedelta(hours=settings.event_retention_hours))
        sweeper = Sweeper(deleter, blobs, metrics, interval_s=settings.sweep_interval_s)
        lifecycle = _lifecycle_watcher(settings, catalog, metrics, session_for, sandbox)
        with contextlib.suppress(StorageError):  # unreachable: readiness says so; the loop retries
            await breakers.refresh()
        backgrounds = [readiness.run(), sampler.run(), reaper.run(), breakers.run(), sweeper.run()]
        backgrounds += [sender.run(), retention]
        if lifecycle is not None:
            # At start, before the API serves: the vendor's dates decide the first submits too.
            await lifecycle.refresh_logged()
            backgrounds.append(lifecycle.run())
        for background in backgrounds:
            task = asyncio.create_task(background)
            # ended before the engine is disposed of: a loop cancelled mid-statement must not find the
            # embedded database's connection gone (its close would then wait forever)
            stack.push_async_callback(_stop_task, task)

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
                    urls,
                    providers,
                    metrics,
                    catalog=catalog,
                    breakers=breakers,
                    reference_allow=parse_networks(settings.reference_allow_networks),
                    webhook_allow=parse_networks(settings.webhook_allow_networks),
                    deadline_s=settings.job_deadline_s,
                    auth=authenticator,
                    max_watch_streams_per_caller=settings.max_watch_streams_per_caller,
                    blobs=blobs,
                    deleter=deleter,
                    retention_s=settings.retention_days * 86_400 or None,
                    admission=Admission(
                        max_pending=settings.max_pending_jobs,
                        max_pending_per_account=settings.max_pending_jobs_per_account,
                        max_submits_per_minute=settings.max_submits_per_minute_per_account,
                        pending_estimate=lambda: sampler.pending,
                    ),
                ),
                registrar,  # type: ignore[arg-type]  # the generated function uses add_generic_rpc_handlers only
            )
            services.append(SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)  # type: ignore[arg-type]
        add_reflection(services, registrar)
        grpc_port = _listen(server, settings)
        if grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {settings.grpc_address}")

        http_runner = web.AppRunner(_http_app(registry, readiness, blobs.local, signer), access_log=None)
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
            catalog=catalog,
            lifecycle=lifecycle,
            breakers=breakers,
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


def _lifecycle_watcher(
    settings: Settings,
    catalog: Catalog,
    metrics: ServiceMetrics,
    session_for: Callable[[str], aiohttp.ClientSession],
    sandbox: Sandbox | None,
) -> LifecycleWatcher | None:
    """OpenAI's lifecycle reader, when OpenAI (or the sandbox standing in for it) is reachable."""
    configured = settings.vendor("openai")
    if configured.api_key:
        base_url, api_key = configured.base_url or VENDORS["openai"].production_url, configured.api_key
    elif sandbox is not None:
        base_url, api_key = configured.base_url or sandbox.base_url, "sandbox"
    else:
        return None
    return LifecycleWatcher(
        catalog,
        metrics,
        session_for("openai"),
        base_url=base_url,
        api_key=api_key,
        interval_s=settings.lifecycle_refresh_s,
    )


def freeze_startup_heap() -> None:
    """Put what the process built at start-up out of the cyclic collector's sight, for good.

    For a process that serves until it stops: modules, the gRPC server, pools and caches live as long as
    it does, yet every full collection scans them again, and under load those collections pause the
    event loop long enough to set the tail latency. Frozen, they are skipped; reference counting still
    frees them. Not for tests, which start many apps in one process and need theirs collected.
    """
    gc.collect()
    gc.freeze()


class _Registrar:
    """A gRPC server to the generated `add_*_to_server` functions: their handlers become generic ones
    only, each with the grpc_server_* metrics.

    grpc.aio accepts each call of a *registered* method through `asyncio.wait` over one outstanding
    request per registered method (and one for the rest), each re-armed after its call: the cost of
    accepting every call grows with the methods registered. As generic handlers the same handlers
    are found by name, and every call is accepted through a single outstanding request (this server
    has 11 methods: its own, health's and reflection's).
    """

    def __init__(self, server: grpc.aio.Server, metrics: GrpcMetrics) -> None:
        self._server = server
        self._metrics = metrics

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([self._metrics.measured(handler) for handler in handlers])

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """The generated code also passes its handlers here; they are already in its generic handler."""


async def _stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a background loop and wait (briefly) until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
        await asyncio.wait_for(task, timeout=5.0)


async def _prune_events(store: SqlJobStore, keep: timedelta) -> None:
    """Drop events older than `keep`, every few minutes (any replica; they serialise on one row)."""
    while True:
        try:
            await store.prune_events(utcnow() - keep)
        except StorageError as exc:
            if not isinstance(exc, SchemaBehind):  # the store logs that, once a minute
                log.warning("event retention could not reach the database: %s", exc)
        except Exception:
            log.exception("event retention failed unexpectedly; it tries again later")
        await asyncio.sleep(min(300.0, keep.total_seconds() / 10))


def _trace_configs(metrics: ServiceMetrics, settings: Settings, vendor: str) -> list[aiohttp.TraceConfig]:
    """A vendor session's request hooks: its metrics, and its spans when tracing is on."""
    configs = [metrics.trace_config(vendor)]
    if tracing.enabled:
        # callers' reference URLs are anyone's servers: they never see our trace ids
        propagate = settings.trace_vendor_propagation and vendor != "references"
        configs.append(tracing.http_trace_config(vendor, propagate=propagate, endpoint_of=endpoint_of))
    return configs


def _http_app(
    registry: CollectorRegistry, readiness: Readiness, blobs: LocalBlobStore | None, signer: UrlSigner
) -> web.Application:
    app = web.Application()
    app.add_routes(http_routes(registry, readiness, blobs, signer))
    return app


def s3_options(settings: Settings) -> S3Options:
    """The S3 client settings (used only when IMAGEGEN_BLOB_URL is s3://…)."""
    return S3Options(
        endpoint=settings.s3_endpoint,
        public_endpoint=settings.s3_public_endpoint,
        region=settings.aws_region,
        access_key_id=settings.aws_access_key_id,
        secret_access_key=settings.aws_secret_access_key,
        session_token=settings.aws_session_token,
        timeout_s=settings.s3_timeout_s,
    )


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
