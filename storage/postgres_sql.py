"""The SQL text of PostgreSQL's statements, apart from the Python that runs them (`storage.dialects`).

Each statement is its own transaction where a write would otherwise take several round trips: the
change, its event rows (with snapshots built from the rows' own values) and its NOTIFYs together.
"""

from __future__ import annotations

import functools

from storage.codec import CREATED_ALIKE, JSON_COLUMNS
from storage.models import NOTICES_PER_NOTIFY

#: the NOTIFY channel every process LISTENs on
NOTIFY_CHANNEL = "imagegen_events"
#: the advisory lock that serialises capped claims across replicas ("imagegen" in ASCII, as a number)
CLAIM_LOCK_KEY = 0x696D61676567656E

#: the NOTIFYs of a transaction's events, in parts of NOTICES_PER_NOTIFY notices (one per line)
NOTIFY_PAYLOADS = "SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"

#: `SqlJobStore.extend_leases` on PostgreSQL: one array parameter rather than an IN list of ids
EXTEND_LEASES = """
UPDATE jobs SET lease_expires_at = $1
WHERE id = ANY($2::uuid[]) AND status = 'processing' AND lease_owner = $3
RETURNING id, attempt
"""

#: `PostgresDialect.save_checkpoints` (one row per job id), fenced as every fenced write is
SAVE_PROVIDER_STATES = """
UPDATE jobs SET provider_state = saved.state::jsonb
FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[]) AS saved(id, attempt, owner, state)
WHERE jobs.id = saved.id AND jobs.status = 'processing'
  AND jobs.attempt = saved.attempt AND jobs.lease_owner = saved.owner
RETURNING jobs.id
"""


def _iso_utc(column: str) -> str:
    """SQL for a timestamptz as ISO 8601 text in UTC, which `datetime.fromisoformat` reads."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""


#: `job_to_json` in SQL over a jobs row's columns, for the events of creates and claims: PostgreSQL builds
#: it from values it already has, sparing the client the encoding. tests/test_store.py holds the two to
#: the same keys and the same decoded job.
_SNAPSHOT = f"""jsonb_build_object(
        'id', id, 'account_id', account_id, 'status', status,
        'spec', jsonb_build_object(
            'prompt', prompt, 'provider', provider, 'width', width, 'height', height,
            'num_variants', num_variants, 'folder_id', folder_id, 'negative_prompt', negative_prompt,
            'seed', seed, 'output_format', output_format,
            'reference_image_urls', reference_image_urls,
            'provider_options', provider_options, 'labels', labels,
            'fallback_providers', fallback_providers, 'fallback_on_moderation', fallback_on_moderation,
            'fallback_options', fallback_options),
        'request_id', coalesce(request_id, ''), 'images', images,
        'error', CASE WHEN coalesce(error_code, '') = '' THEN NULL ELSE jsonb_build_object(
            'code', error_code, 'message', coalesce(error_message, ''),
            'retryable', coalesce(error_retryable, false)) END,
        'estimated_cost_usd_micros', estimated_cost_usd_micros, 'cost_usd_micros', cost_usd_micros,
        'attempt', attempt, 'version', version,
        'create_time', {_iso_utc("create_time")}, 'update_time', {_iso_utc("update_time")},
        'start_time', {_iso_utc("start_time")}, 'end_time', {_iso_utc("end_time")},
        'deadline_at', {_iso_utc("deadline_at")}, 'message', message, 'served_model', served_model,
        'active_provider', active_provider, 'attempt_base', attempt_base,
        'expire_time', {_iso_utc("expire_time")})"""
#: `JobNotice.encode` in SQL, over the same values
_NOTICE_PAYLOAD = "id::text || ' ' || version::text || ' ' || status || ' ' || account_id"


def _notify_in_parts(channel: str, rows: str) -> str:
    """SQL selecting one pg_notify per NOTICES_PER_NOTIFY of `rows`, their notices one per line.

    Each NOTIFY is a message to every listening process and a callback in each, so a statement's
    notices share them (under PostgreSQL's 8000-byte payload limit; see NOTICES_PER_NOTIFY).
    """
    return f"""SELECT pg_notify({channel}, string_agg(line, E'\\n'))
    FROM (
        SELECT {_NOTICE_PAYLOAD} AS line, (row_number() OVER () - 1) / {NOTICES_PER_NOTIFY} AS part
        FROM {rows}
    ) AS notices
    GROUP BY part"""


@functools.cache
def create_statement(columns: tuple[str, ...]) -> str:
    """The single statement of `PostgresDialect.create_batch` for these jobs columns.

    Parameters: $1 the budget-bearing account ids, $2 the NOTIFY channel, $3 the jobs as one JSON array
    of objects keyed by column, which PostgreSQL reads as rows of the jobs table's own type, $4 one such
    object of the columns every job has alike (`CREATED_ALIKE`), the base of each row. (One JSON text
    rather than an array per column, whose elements asyncpg would check and encode one by one.)
    Data-modifying CTEs all run, and the events and notices follow only the rows that the insert kept (a
    taken request_id inserts nothing). Each event's snapshot and notice are built from the row's own
    values (`_SNAPSHOT`, `_notify_in_parts`).
    """
    names = ", ".join(columns + CREATED_ALIKE)
    return f"""
WITH budgeted AS (
    SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = ANY($1::text[])) AS found
),
batch AS (
    SELECT * FROM jsonb_populate_recordset(jsonb_populate_record(NULL::jobs, $4::jsonb), $3::jsonb)
),
created AS (
    INSERT INTO jobs ({names})
    SELECT {names} FROM batch WHERE NOT (SELECT found FROM budgeted)
    ON CONFLICT (account_id, request_id) DO NOTHING
    RETURNING id
),
events AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, status, NULL, message, update_time, {_SNAPSHOT}
    FROM batch JOIN created USING (id)
),
notified AS (
    {_notify_in_parts("$2", "batch JOIN created USING (id)")}
)
SELECT (SELECT found FROM budgeted) AS budgeted,
       ARRAY(SELECT id FROM created) AS created,
       (SELECT count(*) FROM notified) AS notified
"""


#: which rows `claim_statement` takes: the due ones, or the ones a capped claim picked ($2)
CLAIM_DUE = """SELECT id, status AS previous_status, lease_owner AS previous_owner FROM jobs
    WHERE (status = 'pending' AND next_attempt_at <= $1) OR (status = 'processing' AND lease_expires_at < $1)
    ORDER BY next_attempt_at LIMIT $2
    FOR UPDATE SKIP LOCKED"""
CLAIM_PICKED = """SELECT id, status AS previous_status, lease_owner AS previous_owner FROM jobs
    WHERE id = ANY($2::uuid[])"""


@functools.cache
def claim_statement(picked: str) -> str:
    """A claim on PostgreSQL in one statement: the jobs `picked` become PROCESSING, with events and NOTIFYs.

    Parameters: $1 now, $2 the limit (`CLAIM_DUE`) or the ids chosen within the caps (`CLAIM_PICKED`,
    locked earlier in the same transaction), $3 the owner, $4 the lease's end, $5 the NOTIFY channel.
    Answers the claimed rows, oldest due first, with each one's `previous_status`. One statement rather
    than a select, an update, an insert and a NOTIFY with Python between them: the messages, snapshots
    and notices are built here from the rows' own values, as `SqliteDialect.claim` builds them.
    """
    return f"""
WITH picked AS (
    {picked}
),
claimed AS (
    UPDATE jobs SET status = 'processing', attempt = jobs.attempt + 1, lease_owner = $3,
        lease_expires_at = $4, start_time = coalesce(jobs.start_time, $1), version = jobs.version + 1,
        update_time = $1,
        message = CASE WHEN picked.previous_status = 'processing'
            THEN format('lease of %s expired; taken over (attempt %s)',
                        picked.previous_owner, jobs.attempt + 1)
            ELSE format('started (attempt %s)', jobs.attempt + 1) END
    FROM picked WHERE jobs.id = picked.id
    RETURNING jobs.*, picked.previous_status
),
events AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, status, previous_status, message, update_time, {_SNAPSHOT}
    FROM claimed
),
notified AS (
    {_notify_in_parts("$5", "claimed")}
)
SELECT *, (SELECT count(*) FROM notified) AS notified FROM claimed ORDER BY next_attempt_at
"""


@functools.cache
def transition_statement(columns: tuple[str, ...]) -> str:
    """The single statement of `PostgresDialect.claimed_transition` setting these columns besides the usual.

    Parameters: $1 status, $2 message, $3 update time, $4-$6 the fence (id, attempt, owner), $7 the
    claimed version, $8 the NOTIFY channel, $9 the event snapshot, $10 the NOTIFY payload, then one per
    column. The event and the NOTIFY follow only a row the update changed.
    """
    sets = ", ".join(
        f"{name} = ${index}{'::jsonb' if name in JSON_COLUMNS else ''}"
        for index, name in enumerate(columns, start=11)
    )
    return f"""
WITH changed AS (
    UPDATE jobs SET status = $1, version = version + 1, update_time = $3, message = $2, {sets}
    WHERE id = $4 AND status = 'processing' AND attempt = $5 AND lease_owner = $6
      AND version = $7 AND reserved_usd_micros = 0
    RETURNING id, account_id, version, provider_state
),
event AS (
    INSERT INTO job_events
        (job_id, account_id, version, status, previous_status, message, event_time, snapshot)
    SELECT id, account_id, version, $1, 'processing', $2, $3, $9::jsonb FROM changed
),
notified AS (
    SELECT pg_notify($8, $10) FROM changed
)
SELECT provider_state, (SELECT count(*) FROM notified) AS notified FROM changed
"""
