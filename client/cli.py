"""The `imagegen` command line: submit jobs and watch them run, save the images, browse jobs and models."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TextIO

import aiohttp
import grpc

from client._client import OUTPUT_FORMATS, TERMINAL_STATUSES, ImagegenClient, __version__, status_name
from client._errors import ImagegenError, InvalidArgument
from client._output import (
    Progress,
    dumps,
    estimate_details,
    job_details,
    jobs_table,
    outcome,
    providers_table,
    to_dict,
    usd,
)
from imagegen.v1 import imagegen_pb2 as pb

EXIT_OK: Final = 0
EXIT_JOB_FAILED: Final = 1
EXIT_INVALID: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_ERROR: Final = 4
EXIT_INTERRUPTED: Final = 130

DEFAULT_ADDRESS: Final = "127.0.0.1:50051"
DEFAULT_OUT: Final = "imagegen-out"
DEFAULT_TIMEOUT_S: Final = 30.0
STATUS_CHOICES: Final = ("pending", "processing", "completed", "failed", "cancelled")
#: how often a terminal's progress lines are redrawn so that elapsed times move between events
REDRAW_INTERVAL_S: Final = 0.5

_EXIT_BY_CODE: Final[Mapping[grpc.StatusCode, int]] = MappingProxyType(
    {
        grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
        grpc.StatusCode.FAILED_PRECONDITION: EXIT_INVALID,
        grpc.StatusCode.ALREADY_EXISTS: EXIT_INVALID,
        grpc.StatusCode.NOT_FOUND: EXIT_INVALID,
        grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNREACHABLE,
    }
)

EPILOG: Final = f"""\
environment:
  IMAGEGEN_ADDRESS   server address host:port (default {DEFAULT_ADDRESS}); --address wins
  IMAGEGEN_TOKEN     bearer token, sent as `authorization: Bearer ...`; --token wins
  IMAGEGEN_ACCOUNT   account id, sent as `x-account-id`; --account wins

exit codes:
  0    success (every job generated or watched completed)
  1    a job failed or was cancelled
  2    invalid input: a usage error, or the server answered INVALID_ARGUMENT, FAILED_PRECONDITION,
       ALREADY_EXISTS or NOT_FOUND
  3    the server is unreachable: UNAVAILABLE or DEADLINE_EXCEEDED (or its images could not be fetched)
  4    anything else
  130  interrupted (Ctrl-C); a submitted job keeps running on the server
"""

Handler = Callable[[ImagegenClient, argparse.Namespace, "Ui"], Awaitable[int]]


@dataclass(frozen=True)
class Ui:
    """Where the command writes: results to stdout (a table or JSON), progress and errors to stderr."""

    stdout: TextIO
    stderr: TextIO
    json: bool
    color: bool

    def result(self, value: str | Any) -> None:
        """Print a result: text as it is, anything else as JSON."""
        print(value if isinstance(value, str) else dumps(value), file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """Print a human-oriented message on stderr (never mixed into a JSON result)."""
        print(text, file=self.stderr, flush=True)


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the `imagegen` command line with `argv` (default sys.argv) and return its exit code."""
    environ = os.environ if env is None else env
    parser = build_parser(environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    ui = Ui(
        stdout=sys.stdout,
        stderr=sys.stderr,
        json=args.json,
        color=sys.stderr.isatty() and "NO_COLOR" not in environ and environ.get("TERM") != "dumb",
    )
    try:
        return asyncio.run(_run(args, ui))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`imagegen jobs | head`): stop quietly, as other command-line tools do.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def exit_code(error: ImagegenError) -> int:
    """The exit code of a failed call: 2 for bad input, 3 for an unreachable server, 4 for the rest."""
    return _EXIT_BY_CODE.get(error.code, EXIT_ERROR)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser; connection defaults come from the IMAGEGEN_* variables in `env`."""
    parser = argparse.ArgumentParser(
        prog="imagegen",
        description="Generate images with the imagegen service, follow jobs, and browse jobs and models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    _connection_options(parser, env, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, handler: Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # Also accepted after the command (`imagegen jobs --json`), without overriding values given before it.
        _connection_options(sub, env, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    generate = command("generate", "submit a job, show its progress, and save the images", _generate)
    _request_options(generate)
    generate.add_argument(
        "--request-id",
        default=None,
        metavar="ID",
        help="idempotency key (default: a new UUID, so retries never create a second job)",
    )
    generate.add_argument(
        "--out",
        default=DEFAULT_OUT,
        type=Path,
        metavar="DIR",
        help=f"where the images are saved as <job_id>-<n>.<ext> (default ./{DEFAULT_OUT})",
    )
    generate.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    estimate = command("estimate", "validate a request and quote its cost without creating a job", _estimate)
    _request_options(estimate)

    watch = command("watch", "show the progress of jobs until they end", _watch)
    watch.add_argument("job_ids", nargs="+", metavar="JOB")
    watch.add_argument("--out", type=Path, metavar="DIR", help="also save the images of completed jobs here")

    jobs = command("jobs", "list your jobs, newest first", _jobs)
    jobs.add_argument(
        "--status",
        action="append",
        choices=STATUS_CHOICES,
        default=[],
        help="only jobs in this status (repeatable)",
    )
    jobs.add_argument("--folder", default="", help='only jobs of this folder ("root" for the root folder)')
    jobs.add_argument("--provider", default="", help="only jobs of this model")
    jobs.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="at most N jobs (default 20)"
    )

    get = command("get", "show one job", _get)
    get.add_argument("job_id", metavar="JOB")

    cancel = command("cancel", "cancel a job", _cancel)
    cancel.add_argument("job_id", metavar="JOB")

    delete = command("delete", "delete finished jobs and their images (cancel running ones first)", _delete)
    delete.add_argument("job_ids", metavar="JOB", nargs="+")

    command(
        "providers", "the model catalog: limits, prices, and whether each model is configured", _providers
    )
    return parser


# ---------------------------------------------------------------- commands


async def _generate(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    job = await client.generate(**_request(args), request_id=args.request_id)
    if args.no_wait:
        ui.result(to_dict(job) if ui.json else job.id)
        return EXIT_OK
    served = f" on {job.served_model}" if job.served_model else ""
    ui.note(
        f"submitted job {job.id}: {job.provider}{served} {job.width}x{job.height} x{job.num_variants}, "
        f"estimated {usd(job.estimated_cost_usd_micros)}"
    )
    try:
        finals = await _follow(client, [job.id], ui, known=[job])
    except asyncio.CancelledError:
        ui.note(f"\ninterrupted: job {job.id} keeps running; follow it with: imagegen watch {job.id}")
        raise
    return await _conclude(client, finals, ui, out=args.out, single=True)


async def _estimate(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    quote = await client.generate(**_request(args), validate_only=True)
    ui.result(to_dict(quote) if ui.json else estimate_details(quote))
    return EXIT_OK


async def _watch(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    finals = await _follow(client, list(dict.fromkeys(args.job_ids)), ui)
    return await _conclude(client, finals, ui, out=args.out, single=False)


async def _jobs(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    listing = client.list(
        statuses=args.status, folder_id=args.folder, provider=args.provider, limit=args.limit
    )
    jobs = [job async for job in listing]
    if ui.json:
        ui.result([to_dict(job) for job in jobs])
    else:
        ui.result(jobs_table(jobs) if jobs else "no jobs")
    return EXIT_OK


async def _get(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    job = await client.get(args.job_id)
    ui.result(to_dict(job) if ui.json else job_details(job))
    return EXIT_OK


async def _cancel(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    job = await client.cancel(args.job_id)
    ui.result(to_dict(job) if ui.json else f"{job.id}  {status_name(job.status)}")
    return EXIT_OK


async def _delete(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    deleted = []
    for job_id in dict.fromkeys(args.job_ids):
        await client.delete(job_id)
        deleted.append(job_id)
        if not ui.json:
            ui.result(f"{job_id}  deleted")
    if ui.json:
        ui.result({"deleted": deleted})
    return EXIT_OK


async def _providers(client: ImagegenClient, args: argparse.Namespace, ui: Ui) -> int:
    providers = await client.providers()
    ui.result([to_dict(p) for p in providers] if ui.json else providers_table(providers))
    return EXIT_OK


# ---------------------------------------------------------------- running


async def _run(args: argparse.Namespace, ui: Ui) -> int:
    handler: Handler = args.handler
    try:
        async with ImagegenClient.connect(
            args.address, token=args.token or None, account=args.account or None, timeout_s=args.timeout
        ) as client:
            return await handler(client, args, ui)
    except Exception as raised:
        exc = _first_leaf(raised)
        if isinstance(exc, ImagegenError):
            _report(exc, ui, address=args.address)
            return exit_code(exc)
        if isinstance(exc, BrokenPipeError):
            raise exc from None
        if isinstance(exc, OSError):
            ui.note(f"imagegen: {exc}")
            return EXIT_ERROR
        raise


async def _follow(
    client: ImagegenClient, job_ids: Sequence[str], ui: Ui, known: Sequence[pb.Job] = ()
) -> list[pb.Job]:
    """Watch the jobs to their ends, showing progress on stderr; the terminal jobs, in order."""
    progress = Progress(ui.stderr, color=ui.color)
    for job in known:
        progress.add(job)
    ticker = asyncio.create_task(_redraw_every(progress)) if progress.live else None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_follow_one(client, job_id, progress)) for job_id in job_ids]
    finally:
        if ticker is not None:
            ticker.cancel()
            progress.redraw()
    return [task.result() for task in tasks]


async def _follow_one(client: ImagegenClient, job_id: str, progress: Progress) -> pb.Job:
    last: pb.Job | None = None
    async with contextlib.aclosing(client.watch(job_id, include_heartbeats=progress.live)) as events:
        async for event in events:
            progress.update(event)
            last = event.job
    if last is None or last.status not in TERMINAL_STATUSES:
        last = await client.get(job_id)
    return last


async def _redraw_every(progress: Progress) -> None:
    while True:
        await asyncio.sleep(REDRAW_INTERVAL_S)
        progress.redraw()


async def _conclude(
    client: ImagegenClient, jobs: Sequence[pb.Job], ui: Ui, *, out: Path | None, single: bool
) -> int:
    """Save the completed jobs' images, print the outcome, and choose the exit code."""
    saved: dict[str, list[Path]] = {}
    completed = [job for job in jobs if job.status == pb.JOB_STATUS_COMPLETED]
    if out is not None and completed:
        async with aiohttp.ClientSession() as session:
            for job in completed:
                saved[job.id] = list(await client.save_images(job, out, session=session))
    if ui.json:
        results = [
            {"job": to_dict(job), "files": [str(path) for path in saved.get(job.id, [])]} for job in jobs
        ]
        ui.result(results[0] if single else results)
    else:
        for job in jobs:
            ui.result(f"job {job.id}: {outcome(job)}")
            for path in saved.get(job.id, []):
                ui.result(f"  {path}")
    return EXIT_OK if len(completed) == len(jobs) else EXIT_JOB_FAILED


def _report(error: ImagegenError, ui: Ui, *, address: str) -> None:
    violations = error.field_violations if isinstance(error, InvalidArgument) else {}
    if ui.json:
        body: dict[str, Any] = {"code": error.code.name, "message": error.message}
        if violations:
            body["field_violations"] = violations
        if error.retry_after is not None:
            body["retry_after_s"] = error.retry_after
        print(json.dumps({"error": body}), file=ui.stderr, flush=True)
        return
    headline = "the server rejected the request" if violations else error.message
    lines = [f"imagegen: {headline} ({error.code.name})"]
    lines.extend(f"  {field}: {description}" for field, description in violations.items())
    if exit_code(error) == EXIT_UNREACHABLE:
        lines.append(
            f"  is the server running at {address}? (start one with `make run`; set --address or "
            "IMAGEGEN_ADDRESS)"
        )
    ui.note("\n".join(lines))


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as raised by a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------- arguments


def _connection_options(parser: argparse.ArgumentParser, env: Mapping[str, str], *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(env.get("IMAGEGEN_ADDRESS") or DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help=f"server address (IMAGEGEN_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token", default=default(env.get("IMAGEGEN_TOKEN") or ""), help="bearer token (IMAGEGEN_TOKEN)"
    )
    group.add_argument(
        "--account",
        default=default(env.get("IMAGEGEN_ACCOUNT") or ""),
        help="account id (IMAGEGEN_ACCOUNT; the server's default account when unset)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print results as JSON (progress and errors still go to stderr)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT_S),
        metavar="S",
        help=f"deadline of each call to the server, retries included (default {DEFAULT_TIMEOUT_S:g})",
    )


def _request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw (1-2000 characters)")
    parser.add_argument(
        "--provider", default="", help="model id from `imagegen providers` (default flux_2_pro)"
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=(0, 0),
        metavar="WxH",
        help="output size in pixels, e.g. 1080x1920 (default 1024x1024)",
    )
    parser.add_argument(
        "--variants", type=_positive_int, default=0, metavar="N", help="images to make, 1-4 (default 1)"
    )
    parser.add_argument("--folder", default="", help="target folder (default the root folder)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed for reproducible output (variant i: seed + i)"
    )
    parser.add_argument(
        "--format", choices=sorted(OUTPUT_FORMATS), default=None, help="image format (default png)"
    )
    parser.add_argument("--negative", default="", metavar="TEXT", help="what the image should not show")
    parser.add_argument(
        "--ref", action="append", default=[], metavar="URL", help="reference image URL (repeatable)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="provider option (repeatable); VALUE is parsed as JSON when it can be",
    )
    parser.add_argument(
        "--fallback",
        action="append",
        default=[],
        metavar="MODEL",
        help="model to continue on if the provider cannot serve the job (repeatable, in order)",
    )
    parser.add_argument(
        "--fallback-on-moderation",
        action="store_true",
        help="also fall back when a model's moderation refuses the prompt or image",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="label kept with the job (repeatable)",
    )
    parser.add_argument(
        "--ttl",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="delete the job and its images this long after it was created: 3600, 90s, 30m, 12h, 7d "
        "(default: the server's retention)",
    )


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """ImagegenClient.generate's keyword arguments from the request options."""
    width, height = args.size
    return {
        "prompt": args.prompt,
        "provider": args.provider,
        "width": width,
        "height": height,
        "num_variants": args.variants,
        "folder_id": args.folder,
        "negative_prompt": args.negative,
        "seed": args.seed,
        "output_format": args.format,
        "reference_image_urls": args.ref,
        "provider_options": dict(args.option),
        "labels": dict(args.label),
        "ttl_s": args.ttl,
        "fallback_providers": args.fallback,
        "fallback_on_moderation": args.fallback_on_moderation,
    }


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and f"{width}{height}".isascii() and width.isdigit() and height.isdigit()) or (
        int(width) <= 0 or int(height) <= 0
    ):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1080x1920, got {text!r}")
    return int(width), int(height)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration(text: str) -> float:
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit.lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 3600, 90s, 30m, 12h or 7d, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _option(text: str) -> tuple[str, Any]:
    key, raw = _key_value(text)
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw  # a bare word such as `style=vivid` is a string


if __name__ == "__main__":
    sys.exit(main())
