"""Prometheus metrics of one process, in a registry the app owns (nothing registered at module level)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from storage.models import Job


class ServiceMetrics:
    """The job metrics; label values are bounded (provider ids, statuses, error codes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs_submitted = Counter(
            "imagegen_jobs_submitted", "Jobs accepted by GenerateImage.", ["provider"], registry=registry
        )
        self.jobs_started = Counter(
            "imagegen_job_attempts_started", "Attempts started by workers of this process.", ["provider"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "imagegen_jobs_finished", "Jobs that reached a terminal status in this process.",
            ["provider", "status", "code"], registry=registry,
        )
        self.job_retries = Counter(
            "imagegen_job_retries", "Attempts that ended in a retry.", ["provider", "code"], registry=registry
        )
        self.cost_usd = Counter(
            "imagegen_cost_usd", "What completed jobs cost, in USD.", ["provider"], registry=registry
        )
        self.watch_streams = Gauge(
            "imagegen_watch_streams", "Open WatchJob and WatchJobs streams.", ["method"], registry=registry
        )

    def observe_submitted(self, job: Job) -> None:
        """A job was created."""
        self.jobs_submitted.labels(job.spec.provider).inc()

    def observe_claim(self, job: Job) -> None:
        """A worker took a job."""
        self.jobs_started.labels(job.spec.provider).inc()

    def observe_finished(self, job: Job) -> None:
        """A job reached a terminal status."""
        code = job.error.code if job.error is not None and job.status.value == "failed" else ""
        self.jobs_finished.labels(job.spec.provider, job.status.value, code).inc()
        if job.cost_usd_micros:
            self.cost_usd.labels(job.spec.provider).inc(job.cost_usd_micros / 1_000_000)

    def observe_retry(self, job: Job, code: str) -> None:
        """An attempt failed and the job will be tried again."""
        self.job_retries.labels(job.spec.provider, code).inc()
