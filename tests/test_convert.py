"""Conversions that replace a library's slower routine must give what the routine gave."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from server.convert import timestamp
from storage.jobs import spec_hash
from storage.models import JobSpec
from tests.helpers import full_spec


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 21, 16, 1, 2, 345678, tzinfo=UTC),
        datetime(2026, 11, 21, 16, 1, 2, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),  # before the epoch: nanos stay positive
        datetime(2026, 1, 1, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 1, 1, 3, 4, 5, 6),  # naive: taken as UTC, as FromDatetime takes it
    ],
)
def test_timestamp_is_what_from_datetime_gives(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
    assert timestamp(None) is None


def test_spec_hash_is_the_digest_already_stored_with_jobs() -> None:
    # A retried submit is compared with its job by this digest, so its canonical text may never change:
    # these values were computed by the earlier implementation (json.dumps per call).
    full = full_spec()
    assert spec_hash(full) == "8d0c0839532566c2bd3b0429f3bda3002cef60d7749adf2c8cf0d84d10b4e66f"
    bare = JobSpec(prompt="p", provider="flux_2_pro", width=1024, height=1024, num_variants=1)
    assert spec_hash(bare) == "d7ce413829ccec21c3b89b108ed10cbfdf9834b72c213798c16882b695439e13"
