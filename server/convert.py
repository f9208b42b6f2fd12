"""Translation between protobuf messages and storage/domain types (the servicer's only vocabulary change)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from imagegen.v1 import imagegen_pb2 as pb
from providers.catalog import usd_micros_to_cents
from server.files import ImageUrls
from storage.models import EventKind, Job, JobEvent, JobStatus

STATUS_TO_PB = {
    JobStatus.PENDING: pb.JOB_STATUS_PENDING,
    JobStatus.PROCESSING: pb.JOB_STATUS_PROCESSING,
    JobStatus.COMPLETED: pb.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: pb.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: pb.JOB_STATUS_CANCELLED,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STATUS_FROM_PB = {value: key for key, value in STATUS_TO_PB.items()}
FORMAT_TO_PB = {"png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG, "webp": pb.OUTPUT_FORMAT_WEBP}
KIND_TO_PB = {
    EventKind.SNAPSHOT: pb.JOB_EVENT_KIND_SNAPSHOT,
    EventKind.TRANSITION: pb.JOB_EVENT_KIND_TRANSITION,
    EventKind.HEARTBEAT: pb.JOB_EVENT_KIND_HEARTBEAT,
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or None to leave the field unset (a naive datetime is taken as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # What Timestamp.FromDatetime computes, at a fraction of its cost (it runs in Python, twice per Job)
    since = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000
    )


def job_to_pb(job: Job, signer: ImageUrls) -> pb.Job:
    """The Job message, with freshly signed image URLs."""
    spec = job.spec
    message = pb.Job(
        id=str(job.id),
        status=STATUS_TO_PB[job.status],
        prompt=spec.prompt,
        provider=spec.provider,
        width=spec.width,
        height=spec.height,
        num_variants=spec.num_variants,
        folder_id=spec.folder_id,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        output_format=FORMAT_TO_PB[spec.output_format],
        reference_image_urls=spec.reference_image_urls,
        request_id=job.request_id,
        estimated_cost_cents=usd_micros_to_cents(job.estimated_cost_usd_micros),
        estimated_cost_usd_micros=job.estimated_cost_usd_micros,
        cost_cents=usd_micros_to_cents(job.cost_usd_micros),
        cost_usd_micros=job.cost_usd_micros,
        attempt=job.attempt,
        version=job.version,
        create_time=timestamp(job.create_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
        update_time=timestamp(job.update_time),
        account_id=job.account_id,
        expire_time=timestamp(job.expire_time),
        served_model=job.served_model,
        served_provider=job.serving_provider,
    )
    if spec.fallback_providers:
        message.fallback_providers.extend(spec.fallback_providers)
        message.fallback_on_moderation = spec.fallback_on_moderation
        for name, fallback_options in spec.fallback_options.items():
            if fallback_options:
                json_format.ParseDict(dict(fallback_options), message.fallback_provider_options[name])
    if spec.labels:  # building a protobuf map costs even when empty: most jobs have no labels
        message.labels.update(spec.labels)
    if spec.provider_options:
        options = struct_pb2.Struct()
        json_format.ParseDict(dict(spec.provider_options), options)
        message.provider_options.CopyFrom(options)
    for image in job.images:
        url = signer.sign(image.key)
        message.images.append(
            pb.Image(
                url=url,
                width=image.width,
                height=image.height,
                content_type=image.content_type,
                size_bytes=image.size_bytes,
                sha256=image.sha256,
                seed=image.seed,
                native_width=image.native_width,
                native_height=image.native_height,
            )
        )
        message.result_urls.append(url)
    if job.error is not None:
        message.error.CopyFrom(
            pb.JobError(code=job.error.code, message=job.error.message, retryable=job.error.retryable)
        )
    return message


class EventEncoder:
    """Converts each event to protobuf once, however many streams send it.

    An event row never changes (it is one version of one job), so the message can be shared; entries
    are kept for `max_age_s` so that the image URLs they carry are freshly signed enough.
    """

    def __init__(self, signer: ImageUrls, *, size: int = 4096, max_age_s: float = 30.0) -> None:
        self._signer = signer
        self._size = size
        self._max_age_s = max_age_s
        self._cache: OrderedDict[tuple[uuid.UUID, int, EventKind], tuple[float, pb.JobEvent]] = OrderedDict()

    def encode(self, event: JobEvent) -> pb.JobEvent:
        """The message of a transition event (shared), or of a snapshot/heartbeat (made afresh)."""
        if event.kind is not EventKind.TRANSITION:
            return event_to_pb(event, self._signer)
        key = (event.job.id, event.version, event.kind)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._max_age_s:
            return cached[1]
        message = event_to_pb(event, self._signer)
        self._cache[key] = (now, message)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return message


def event_to_pb(event: JobEvent, signer: ImageUrls) -> pb.JobEvent:
    """The JobEvent message."""
    return pb.JobEvent(
        job=job_to_pb(event.job, signer),
        previous_status=STATUS_TO_PB[event.previous_status]
        if event.previous_status
        else pb.JOB_STATUS_UNSPECIFIED,
        version=event.version,
        event_time=timestamp(event.event_time),
        kind=KIND_TO_PB[event.kind],
        message=event.message,
    )
