"""What the command line shows: tables, JSON, money and times, and the live progress display of jobs."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from client._client import TERMINAL_STATUSES, status_name
from imagegen.v1 import imagegen_pb2 as pb

_FORMAT_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        pb.OUTPUT_FORMAT_UNSPECIFIED: "png",
        pb.OUTPUT_FORMAT_PNG: "png",
        pb.OUTPUT_FORMAT_JPEG: "jpeg",
        pb.OUTPUT_FORMAT_WEBP: "webp",
    }
)
_COLORS: Final[Mapping[int, str]] = MappingProxyType(
    {
        pb.JOB_STATUS_PENDING: "33",  # yellow
        pb.JOB_STATUS_PROCESSING: "36",  # cyan
        pb.JOB_STATUS_COMPLETED: "32",  # green
        pb.JOB_STATUS_FAILED: "31",  # red
        pb.JOB_STATUS_CANCELLED: "90",  # grey
    }
)
_PROMPT_CHARS: Final = 40


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data, in protobuf's canonical JSON mapping with the .proto field names."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def dumps(value: Any) -> str:
    """Indented JSON text."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def usd(micros: int) -> str:
    """US dollars from micros, to the tenth of a cent when it matters: $0.09, $0.135."""
    text = f"{micros / 1_000_000:.4f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def format_name(value: pb.OutputFormat.ValueType) -> str:
    """ "png", "jpeg" or "webp"."""
    return _FORMAT_NAMES.get(value, "png")


def local_time(job: pb.Job) -> str:
    """When the job was created, in local time to the second."""
    if not job.HasField("create_time"):
        return "-"
    return datetime.fromtimestamp(job.create_time.ToNanoseconds() / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned on their widest cell; the last column is not padded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for row in (headers, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, str]]) -> str:
    """Key-value lines with the values aligned."""
    width = max((len(key) for key, _ in items), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in items)


def jobs_table(jobs: Sequence[pb.Job]) -> str:
    """The jobs listing: one row per job, newest first as the server returns them."""
    rows = [
        [
            job.id,
            status_name(job.status),
            job.provider,
            f"{job.width}x{job.height}",
            str(job.num_variants),
            job.folder_id or "root",
            _cost(job),
            local_time(job),
            _shorten(job.prompt, _PROMPT_CHARS),
        ]
        for job in jobs
    ]
    return table(["ID", "STATUS", "PROVIDER", "SIZE", "N", "FOLDER", "COST", "CREATED", "PROMPT"], rows)


def providers_table(providers: Sequence[pb.Provider]) -> str:
    """The catalog: limits, capabilities and prices of each model, and whether this server can run it."""
    rows = [
        [
            p.id,
            p.display_name,
            "yes" if p.configured else "no",
            f"{p.min_width}-{p.max_width}",
            f"{p.min_height}-{p.max_height}",
            str(p.max_variants),
            "yes" if p.supports_seed else "no",
            str(p.max_reference_images),
            ",".join(format_name(f) for f in p.output_formats),
            usd(p.price_1024_usd_micros),
            p.served_model,
            lifecycle(p),
            p.price_summary,
        ]
        for p in providers
    ]
    return table(
        [
            "ID",
            "NAME",
            "READY",
            "WIDTH",
            "HEIGHT",
            "VARIANTS",
            "SEED",
            "REFS",
            "FORMATS",
            "1024²",
            "SERVED BY",
            "LIFECYCLE",
            "PRICING",
        ],
        rows,
    )


def lifecycle(provider: pb.Provider) -> str:
    """A model's lifecycle in a few words: "active", "retired 2026-12-01, alias of gpt_image_2_6"."""
    words = provider.lifecycle_state or "active"
    if provider.shutdown_date:
        words += f" {provider.shutdown_date}"
    if provider.alias_of:
        words += f", alias of {provider.alias_of}"
    elif provider.replacement:
        words += f", use {provider.replacement}"
    return words


def job_details(job: pb.Job) -> str:
    """One job, field by field, with its images."""
    items = [
        ("id", job.id),
        ("status", status_name(job.status)),
        ("provider", job.provider),
        ("served by", _served(job)),
        ("size", f"{job.width}x{job.height} x{job.num_variants} {format_name(job.output_format)}"),
        ("folder", job.folder_id or "root"),
        ("prompt", job.prompt),
        ("attempt", str(job.attempt)),
        ("created", local_time(job)),
        ("cost", _cost(job)),
    ]
    if job.HasField("seed"):
        items.insert(6, ("seed", str(job.seed)))
    if job.HasField("error") and job.error.code:
        items.append(("error", f"{job.error.code}: {job.error.message}"))
    if job.HasField("expire_time"):
        expires = datetime.fromtimestamp(job.expire_time.ToNanoseconds() / 1e9)
        items.append(("expires", expires.strftime("%Y-%m-%d %H:%M:%S")))
    for number, image in enumerate(job.images, 1):
        items.append((f"image {number}", f"{image.width}x{image.height} {image.content_type} {image.url}"))
    return pairs(items)


def estimate_details(job: pb.Job) -> str:
    """The normalised request of a validate_only call, and its quote."""
    items = [
        ("provider", job.provider),
        ("served by", job.served_model or "-"),
        ("size", f"{job.width}x{job.height}"),
        ("variants", str(job.num_variants)),
        ("format", format_name(job.output_format)),
        ("folder", job.folder_id or "root"),
    ]
    if job.HasField("seed"):
        items.append(("seed", str(job.seed)))
    items.append(("estimate", f"{usd(job.estimated_cost_usd_micros)} ({job.estimated_cost_cents} ¢ billed)"))
    return pairs(items)


def _served(job: pb.Job) -> str:
    """The vendor model, and the fallback that served the job if it was not `provider`."""
    if job.served_provider and job.served_provider != job.provider:
        return f"{job.served_model} (fallback {job.served_provider})"
    return job.served_model or "-"


def outcome(job: pb.Job) -> str:
    """One phrase for how a terminal job ended."""
    if job.status == pb.JOB_STATUS_COMPLETED:
        count = len(job.images)
        images = f"{count} image{'s' if count != 1 else ''} {job.width}x{job.height}"
        served = f" by {_served(job)}" if job.served_model else ""
        return f"done: {images}{served}, cost {usd(job.cost_usd_micros)}"
    if job.status == pb.JOB_STATUS_FAILED:
        return f"failed: {job.error.code}: {job.error.message}" if job.error.code else "failed"
    if job.status == pb.JOB_STATUS_CANCELLED:
        return "cancelled"
    return status_name(job.status)


def _cost(job: pb.Job) -> str:
    if job.status in TERMINAL_STATUSES:
        return usd(job.cost_usd_micros)
    return f"~{usd(job.estimated_cost_usd_micros)}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Line:
    job: pb.Job
    note: str = ""
    retries: int = 0


class Progress:
    """Live status of jobs: one line per job redrawn in place on a terminal, one line per event otherwise."""

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        color: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        self.live = stream.isatty() if live is None else live
        self._color = color and self.live
        self._clock = clock
        self._lines: dict[str, _Line] = {}
        self._drawn = 0
        self._log: list[str] = []

    def add(self, job: pb.Job) -> None:
        """Give a job its line (lines keep the order in which jobs were added)."""
        note = outcome(job) if job.status in TERMINAL_STATUSES else ""
        self._lines.setdefault(job.id, _Line(job=job, note=note))
        if self.live:
            self.redraw()

    def update(self, event: pb.JobEvent) -> None:
        """Show one event of a job."""
        if event.kind == pb.JOB_EVENT_KIND_HEARTBEAT:
            if self.live:
                self.redraw()
            return
        job = event.job
        line = self._lines.setdefault(job.id, _Line(job=job))
        line.job = job
        if event.message:
            line.note = event.message
        if (
            event.previous_status == pb.JOB_STATUS_PROCESSING
            and job.status == pb.JOB_STATUS_PENDING
            and event.message.startswith("retrying")
        ):
            line.retries += 1  # the worker's retry events say "retrying in …"; a hand-back does not count
            # A status line is too narrow for the reason; keep each retry's full reason above the live lines.
            self._log.append(f"{job.id[:8]}  retry {line.retries}: {event.message}")
        if job.status in TERMINAL_STATUSES:
            line.note = outcome(job)
        if self.live:
            self.redraw()
        else:
            stamp = datetime.fromtimestamp(self._clock()).strftime("%H:%M:%S")
            self._stream.write(f"{stamp}  {self._text(line)}\n")
            self._stream.flush()

    def redraw(self) -> None:
        """Redraw every line in place (a terminal only): the elapsed times move even when nothing happens."""
        if not self.live or not self._lines:
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        parts = [f"\x1b[{self._drawn}F"] if self._drawn else []
        parts.extend(f"\x1b[2K{entry}\n" for entry in self._log)
        self._log.clear()
        for line in self._lines.values():
            text = self._text(line)
            if len(text) > width:
                text = text[: width - 1] + "…"
            if self._color:
                name = status_name(line.job.status)
                text = text.replace(name, f"\x1b[{_COLORS.get(line.job.status, '0')}m{name}\x1b[0m", 1)
            parts.append(f"\x1b[2K{text}\n")
        self._drawn = len(self._lines)
        self._stream.write("".join(parts))
        self._stream.flush()

    def _text(self, line: _Line) -> str:
        job = line.job
        retries = f"  {line.retries} retr{'ies' if line.retries != 1 else 'y'}" if line.retries else ""
        note = f"  {line.note}" if line.note else ""
        return (
            f"{job.id[:8]}  {status_name(job.status):<10}  attempt {job.attempt}  "
            f"{self._elapsed(job):5.1f}s{retries}{note}"
        )

    def _elapsed(self, job: pb.Job) -> float:
        if not job.HasField("create_time"):
            return 0.0
        start = job.create_time.ToNanoseconds() / 1e9
        end = (
            job.end_time.ToNanoseconds() / 1e9
            if job.status in TERMINAL_STATUSES and job.HasField("end_time")
            else self._clock()
        )
        return max(0.0, end - start)
