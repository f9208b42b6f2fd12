"""Configuration: environment variables read once, at start, into one frozen object.

Every variable has the `IMAGEGEN_` prefix except the vendor keys, which keep the names the vendors'
own tools use (`BFL_API_KEY`, `OPENAI_API_KEY`, `ARK_API_KEY`, `GEMINI_API_KEY`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from providers.references import parse_networks

PREFIX = "IMAGEGEN_"


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


@dataclass(frozen=True, kw_only=True)
class VendorSettings:
    """How to reach one vendor API."""

    api_key: str = field(default="", repr=False)  # never in a log line or a traceback
    base_url: str = ""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the process is configured with; the README and the topic docs it links document each."""

    #: gRPC listen address; port 0 picks a free port (tests)
    grpc_address: str = "127.0.0.1:50051"
    #: HTTP side: /metrics, /healthz, /readyz, /files
    http_address: str = "127.0.0.1:8080"
    #: where the embedded database, result images and the local URL-signing key live
    data_dir: Path = Path("./var")
    #: postgresql://… (production, replicas) or sqlite:///… (embedded); default: SQLite in data_dir
    database_url: str = ""
    db_pool_size: int = 20
    #: seconds any single database statement or connection attempt may take
    db_timeout_s: float = 10.0
    #: result images; default data_dir/blobs (the directory of the file store)
    blob_dir: Path | None = None
    #: where result images live: file:///path (default: file://<blob_dir>) or s3://bucket/prefix
    blob_url: str = ""
    #: the S3 API endpoint for stores other than AWS (MinIO, SeaweedFS, R2, GCS interoperability…)
    s3_endpoint: str = ""
    #: the endpoint image URLs are presigned for (callers download from it); default: s3_endpoint
    s3_public_endpoint: str = ""
    #: seconds one request to the blob store may take
    s3_timeout_s: float = 10.0
    #: from the standard AWS variables (AWS_REGION, AWS_ACCESS_KEY_ID, …); empty credentials leave the
    #: rest of AWS's chain (web identity, instance profile) to find them
    aws_region: str = ""
    aws_access_key_id: str = field(default="", repr=False)
    aws_secret_access_key: str = field(default="", repr=False)
    aws_session_token: str = field(default="", repr=False)
    #: jobs (rows, events, images) are deleted this many days after they were created, unless the
    #: request's ttl says otherwise; 0 keeps them forever
    retention_days: float = 0.0
    #: how often each replica looks for expired jobs and stale temporary files
    sweep_interval_s: float = 60.0
    #: base of the signed image URLs handed to callers; default http://<host:port the HTTP side bound>
    public_base_url: str = ""
    #: HMAC key for image URLs; default: a random key kept in data_dir (share one key across replicas)
    url_signing_key: str = ""
    url_ttl_s: float = 3600.0
    #: JSON file of callers' token digests and accounts (server/auth.py); unset: local mode (loopback only)
    auth_tokens_file: Path | None = None
    #: TLS for the gRPC port: certificate chain and key (PEM); with a client CA, clients must present a
    #: certificate it signed (mutual TLS)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    #: networks reference-image URLs may reach besides the public internet, e.g. "127.0.0.0/8" for the
    #: sandbox and tests (never needed in production)
    reference_allow_networks: str = ""
    #: how long job events are kept: WatchJobs resumes within this window (OUT_OF_RANGE before it)
    event_retention_hours: float = 168.0
    #: how long a webhook delivery is retried before it is given up
    webhook_retry_hours: float = 24.0
    #: per webhook request; a slower receiver counts as a failure and is tried again
    webhook_timeout_s: float = 10.0
    #: the first retry's delay; each later one doubles it (with jitter), up to an hour
    webhook_retry_base_s: float = 5.0
    #: networks webhook URLs may reach besides the public internet (and then over http too), e.g.
    #: "127.0.0.0/8" for tests (never needed in production)
    webhook_allow_networks: str = ""
    #: all | api | worker
    role: str = "all"
    #: jobs one process runs at once
    worker_concurrency: int = 64
    lease_s: float = 30.0
    #: how often workers look for due jobs and the event hub re-reads what it may have missed
    poll_interval_s: float = 2.0
    job_deadline_s: float = 300.0
    max_attempts: int = 4
    #: vendor tasks (variants) running at once across all replicas, per vendor: "bfl=24,openai=0" (0: no cap)
    vendor_concurrency: str = "bfl=24"
    #: GenerateImage answers RESOURCE_EXHAUSTED past this many pending jobs (whole queue; 0: no cap)
    max_pending_jobs: int = 100_000
    #: … or past this many pending jobs of the caller's account (0: no cap)
    max_pending_jobs_per_account: int = 5_000
    #: jobs of one account processing at once, across replicas; the rest wait in PENDING (0: no cap)
    max_in_flight_per_account: int = 0
    #: GenerateImage calls one account may make per minute; more answer RESOURCE_EXHAUSTED (0: no cap)
    max_submits_per_minute_per_account: int = 0
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0
    #: circuit breakers, one per vendor, shared by every replica: a vendor's breaker opens when at least
    #: BREAKER_MIN_REQUESTS requests in a BREAKER_WINDOW_S window were counted and this share of them failed
    breaker_failure_ratio: float = 0.5
    breaker_min_requests: int = 10
    breaker_window_s: float = 60.0
    #: how long an open breaker stays open before BREAKER_PROBES requests (across replicas) test the vendor
    breaker_cooldown_s: float = 30.0
    breaker_probes: int = 1
    #: how often each replica adds its counts to the shared breakers and reads them back
    breaker_refresh_s: float = 1.0
    watch_heartbeat_s: float = 15.0
    #: WatchJob and WatchJobs streams one caller (token) may hold open in this process (0: no cap)
    max_watch_streams_per_caller: int = 1_000
    shutdown_grace_s: float = 10.0
    #: per HTTP request to a vendor
    provider_timeout_s: float = 120.0
    #: BFL: the first poll of a task (FLUX.2 takes seconds; polls back off from here to 3 s)
    bfl_poll_interval_s: float = 1.0
    #: BFL: polls one process makes a second at most, shared by its tasks (past it, each is polled less often)
    bfl_max_polls_per_s: float = 250.0
    #: while a process's event loop is saturated, how long a submit waits for others to share its commit
    #: (0: never; lower it where the tail at moderate load matters more than peak throughput)
    group_commit_linger_s: float = 0.003
    #: the share of wall time the event loop's thread must lately have been runnable (on a core or waiting
    #: for one) to count as saturated, which starts the linger above
    saturated_share: float = 0.8
    #: auto: serve vendors without a key from the in-process sandbox; off: leave them unconfigured
    sandbox: str = "auto"
    #: the model catalog (TOML); default: the one shipped in providers/catalog.toml
    catalog_file: Path | None = None
    #: how often vendors' own lifecycle data (OpenAI's GET /v1/models shutdown_date) is read again
    lifecycle_refresh_s: float = 86400.0
    #: how long sandbox tasks take (so that PROCESSING is visible in a demo)
    sandbox_latency_s: float = 1.0
    #: the in-process sandbox's port (and the next one, its second "cluster" host); 0: any free ports.
    #: Fixed ports let a restarted server reach the sandbox that its handed-back jobs were polling.
    sandbox_port: int = 0
    log_level: str = "INFO"
    #: json (one object per line, for log pipelines) or text (for people; `make run` uses it)
    log_format: str = "json"
    #: OpenTelemetry tracing; `from_env` turns it on when the standard OTEL_* variables name an exporter
    tracing: bool = False
    #: send our `traceparent` to vendor APIs too (off: vendors never see our trace ids)
    trace_vendor_propagation: bool = False
    bfl: VendorSettings = field(default_factory=VendorSettings)
    openai: VendorSettings = field(default_factory=VendorSettings)
    ark: VendorSettings = field(default_factory=VendorSettings)
    gemini: VendorSettings = field(default_factory=VendorSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment (or `env`); `overrides` win over both (tests use them)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("bfl", "openai", "ark", "gemini") or f.name in _AWS_VARIABLES:
                continue
            raw = env.get(PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.type)
        for vendor, key_var in (
            ("bfl", "BFL_API_KEY"),
            ("openai", "OPENAI_API_KEY"),
            ("ark", "ARK_API_KEY"),
            ("gemini", "GEMINI_API_KEY"),
        ):
            values[vendor] = VendorSettings(
                api_key=env.get(key_var, ""), base_url=env.get(f"{PREFIX}{vendor.upper()}_BASE_URL", "")
            )
        for name, variables in _AWS_VARIABLES.items():
            found = next((env[v] for v in variables if env.get(v)), "")
            if found:
                values[name] = found
        values.setdefault("tracing", tracing_wanted(env))
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Check cross-field rules and fill the derived defaults."""
        self._check_values()
        self._check_security()
        changes: dict[str, Any] = {}
        if not self.database_url:
            changes["database_url"] = f"sqlite+aiosqlite:///{(self.data_dir / 'imagegen.db').resolve()}"
        if self.blob_dir is None:
            changes["blob_dir"] = self.data_dir / "blobs"
        if not self.blob_url:
            blob_dir: Path = changes.get("blob_dir") or self.blob_dir or self.data_dir / "blobs"
            changes["blob_url"] = f"file://{blob_dir.resolve()}"
        return dataclasses.replace(self, **changes) if changes else self

    def _check_values(self) -> None:
        if self.role not in ("all", "api", "worker"):
            raise SettingsError(f"{PREFIX}ROLE must be all, api or worker, not {self.role!r}")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"{PREFIX}LOG_FORMAT must be json or text, not {self.log_format!r}")
        if self.sandbox not in ("auto", "off"):
            raise SettingsError(f"{PREFIX}SANDBOX must be auto or off, not {self.sandbox!r}")
        for name in (
            "worker_concurrency",
            "max_attempts",
            "db_pool_size",
            "breaker_min_requests",
            "breaker_probes",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{PREFIX}{name.upper()} must be at least 1")
        for name in (
            "lease_s",
            "poll_interval_s",
            "job_deadline_s",
            "url_ttl_s",
            "watch_heartbeat_s",
            "bfl_poll_interval_s",
            "bfl_max_polls_per_s",
            "event_retention_hours",
            "webhook_retry_hours",
            "webhook_timeout_s",
            "webhook_retry_base_s",
            "s3_timeout_s",
            "sweep_interval_s",
            "lifecycle_refresh_s",
            "breaker_window_s",
            "breaker_cooldown_s",
            "breaker_refresh_s",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()} must be positive")
        if self.group_commit_linger_s < 0:
            raise SettingsError(f"{PREFIX}GROUP_COMMIT_LINGER_S must not be negative")
        if not 0 < self.saturated_share <= 1:
            raise SettingsError(f"{PREFIX}SATURATED_SHARE must be in (0, 1]")
        if not 0 < self.breaker_failure_ratio <= 1:
            raise SettingsError(f"{PREFIX}BREAKER_FAILURE_RATIO must be in (0, 1]")
        self.vendor_caps()  # raises on a malformed value
        if self.retention_days < 0:
            raise SettingsError(f"{PREFIX}RETENTION_DAYS must be 0 (keep forever) or more")
        if self.blob_url and not self.blob_url.startswith(("file://", "s3://")):
            raise SettingsError(f"{PREFIX}BLOB_URL must be file:///path or s3://bucket/prefix")
        if self.blob_url.startswith("s3://") and self.url_ttl_s > 7 * 86_400:
            # SigV4 presigned URLs are valid for at most 7 days
            raise SettingsError(f"{PREFIX}URL_TTL_S must be at most 604800 (7 days) with an S3 store")

    def _check_security(self) -> None:
        try:
            parse_networks(self.reference_allow_networks)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}REFERENCE_ALLOW_NETWORKS: {exc}") from None
        try:
            parse_networks(self.webhook_allow_networks)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}WEBHOOK_ALLOW_NETWORKS: {exc}") from None
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError(f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise SettingsError(
                f"{PREFIX}TLS_CLIENT_CA_FILE needs {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE"
            )
        if self.auth_tokens_file is None:
            for name in ("grpc_address", "http_address"):
                host, _ = split_address(getattr(self, name))
                if not _is_loopback(host):
                    raise SettingsError(
                        f"refusing to listen on {getattr(self, name)} without authentication: set "
                        f"{PREFIX}AUTH_TOKENS_FILE, or keep {PREFIX}{name.upper()} on a loopback address"
                    )

    def vendor_caps(self) -> dict[str, int]:
        """IMAGEGEN_VENDOR_CONCURRENCY as {vendor: max tasks}, without the uncapped (0) ones."""
        caps: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in self.vendor_concurrency.split(","))):
            vendor, sep, value = item.partition("=")
            if (
                not sep
                or not (value.strip().isascii() and value.strip().isdigit())
                or vendor.strip() not in ("bfl", "openai", "ark", "gemini")
            ):
                raise SettingsError(
                    f"{PREFIX}VENDOR_CONCURRENCY must look like 'bfl=24,openai=0' "
                    "(vendors: bfl, openai, ark, "
                    f"gemini), not {self.vendor_concurrency!r}"
                )
            if int(value):
                caps[vendor.strip()] = int(value)
        return caps

    def vendor(self, name: str) -> VendorSettings:
        """The settings of vendor `name` ("bfl", "openai", "ark", "gemini")."""
        value = getattr(self, name)
        assert isinstance(value, VendorSettings)
        return value


#: settings read from the standard AWS variables rather than IMAGEGEN_ ones (first set wins)
_AWS_VARIABLES = {
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
}


def _parse(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if "Path" in kind:  # "Path" and "Path | None"
            return Path(raw)
        return raw
    except ValueError:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None


def tracing_wanted(env: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* variables ask for traces: an OTLP endpoint, or a traces exporter.

    The SDK's own default exporter is OTLP to localhost; here nothing set means no SDK at all, so a
    process nobody configured for tracing pays nothing for it.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' into (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise SettingsError(f"address {address!r} must be host:port")
    return host.strip("[]"), int(port)
