"""The output side of an attempt (fit, store through outages, remove), shared with the reaper and servicer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence

from providers.base import GenerationResult, InvalidProviderResponse
from providers.imaging import FittedImage, fit_image
from server import tracing
from storage.blobs import BlobStore, attempt_prefix, image_key
from storage.errors import BlobExists, BlobStoreUnavailable, StorageError
from storage.models import Job, JobStatus, StoredImage, utcnow

log = logging.getLogger(__name__)


class Outputs:
    """Fits the vendor's images to the request, stores them through outages, and removes unkept attempts."""

    def __init__(self, blobs: BlobStore, *, lease_s: float) -> None:
        self._blobs = blobs
        self._lease_s = lease_s

    async def fit(self, job: Job, result: GenerationResult) -> list[tuple[FittedImage, int | None]]:
        spec = job.spec
        if len(result.images) != spec.num_variants:
            raise InvalidProviderResponse(f"asked for {spec.num_variants} images, got {len(result.images)}")
        fitted: list[tuple[FittedImage, int | None]] = []
        for image in result.images:
            # decode, crop and encode are CPU work: off the event loop, so RPCs never wait on them
            fitted.append(
                (
                    await asyncio.to_thread(
                        fit_image,
                        image.data,
                        width=spec.width,
                        height=spec.height,
                        output_format=spec.output_format,
                    ),
                    image.seed,
                )
            )
        return fitted

    async def write(self, job: Job, fitted: Sequence[tuple[FittedImage, int | None]]) -> list[StoredImage]:
        """Store every image, retrying through a blob store outage until the job's deadline.

        The vendor has made (and billed) these images: they stay in memory and the writes are retried
        rather than the vendor called again. The job completes only after the store acknowledged all of
        them. The lease keeps being extended meanwhile; if it is lost, this attempt is cancelled.
        """
        spec = job.spec
        keys = [
            image_key(job.account_id, spec.folder_id, job.id, job.attempt, index, image.content_type)
            for index, (image, _seed) in enumerate(fitted)
        ]
        loop = asyncio.get_running_loop()
        # leave time for the final write that fails the job, inside the deadline
        give_up = loop.time() + (job.deadline_at - utcnow()).total_seconds() - self._lease_s / 3
        waiting = list(range(len(fitted)))
        delay = 0.1
        while True:
            outcomes = await asyncio.gather(
                *(self._put(keys[i], fitted[i][0]) for i in waiting), return_exceptions=True
            )
            errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            for error in errors:
                if not isinstance(error, BlobStoreUnavailable):
                    raise error
            if not errors:
                break
            failed = [i for i, outcome in zip(waiting, outcomes, strict=True) if outcome is not None]
            error = errors[0]
            if loop.time() + delay > give_up:
                raise error
            log.warning(
                "job %s: blob store unavailable (%s); retrying %d image writes in %.1f s",
                job.id,
                error,
                len(failed),
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)
            waiting = failed
        return [
            StoredImage(
                key=key,
                width=image.width,
                height=image.height,
                content_type=image.content_type,
                size_bytes=len(image.data),
                sha256=image.sha256,
                seed=seed,
                native_width=image.native_width,
                native_height=image.native_height,
            )
            for key, (image, seed) in zip(keys, fitted, strict=True)
        ]

    async def _put(self, key: str, image: FittedImage) -> None:
        try:
            if tracing.enabled:
                with tracing.child_span(
                    "blob put", {"imagegen.blob.key": key, "imagegen.blob.bytes": len(image.data)}
                ):
                    await self._blobs.put(key, image.data, content_type=image.content_type)
            else:
                await self._blobs.put(key, image.data, content_type=image.content_type)
        except BlobExists:
            # Only this attempt writes its keys: a blob already there is an earlier try of this write
            # whose answer was lost. Same size, it is ours; otherwise something else wrote it.
            if await self._blobs.size(key) != len(image.data):
                raise
        return None

    async def delete_attempt(self, job: Job) -> None:
        """Remove what this attempt stored (best effort: a store that is down keeps it for the sweeper)."""
        with contextlib.suppress(StorageError):
            await self._blobs.delete_prefix(
                attempt_prefix(job.account_id, job.spec.folder_id, job.id, job.attempt)
            )

    async def remove_other_attempts(self, job: Job) -> None:
        """`remove_other_attempts` on this worker's blob store."""
        await remove_other_attempts(self._blobs, job)


async def remove_other_attempts(blobs: BlobStore, job: Job) -> None:
    """Delete the images of every attempt of an ended job but the one it completed with.

    An attempt killed mid-write, or one that stored part of its images and then failed, leaves files
    that nothing references; whatever ends the job removes them.
    """
    keep = job.attempt if job.status is JobStatus.COMPLETED else None
    for attempt in range(1, job.attempt + 1):
        if attempt != keep:
            # best effort: a store that is down keeps them for the retention sweep of the whole job
            with contextlib.suppress(StorageError):
                await blobs.delete_prefix(attempt_prefix(job.account_id, job.spec.folder_id, job.id, attempt))
