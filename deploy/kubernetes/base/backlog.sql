WITH due AS (
    SELECT id, account_id, num_variants, next_attempt_at, CASE WHEN active_provider IN ('flux_2_max', 'flux_2_pro') THEN 'bfl' END AS cap
    FROM jobs
    WHERE status = 'pending' AND next_attempt_at <= now()
  ),
  limits (cap, max_tasks) AS (VALUES ('bfl', 24)),
  in_use AS (
    SELECT CASE WHEN active_provider IN ('flux_2_max', 'flux_2_pro') THEN 'bfl' END AS cap, sum(num_variants) AS tasks
    FROM jobs WHERE status = 'processing' GROUP BY 1
  ),
  queued AS (
    SELECT due.*,
           sum(num_variants) OVER oldest_first AS tasks_so_far,
           row_number() OVER oldest_first AS place
    FROM due
    WINDOW oldest_first AS (PARTITION BY cap ORDER BY next_attempt_at, id)
  ),
  startable AS (
    SELECT queued.*
    FROM queued
    LEFT JOIN limits USING (cap)
    LEFT JOIN in_use USING (cap)
    WHERE limits.cap IS NULL
       OR queued.tasks_so_far <= limits.max_tasks - coalesce(in_use.tasks, 0)
       OR (queued.place = 1 AND coalesce(in_use.tasks, 0) = 0)
  )
SELECT (SELECT count(*) FROM startable) + (SELECT count(*) FROM jobs WHERE status = 'processing')
