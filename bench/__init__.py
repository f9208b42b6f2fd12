"""Benchmarks of the service against real PostgreSQL and real servers on loopback, each beside a baseline.

Run every scenario with `make bench` (or `python -m bench [--scenario NAME] [--quick]`); the results go to
stdout as one table and to `bench/results.json`. Scenarios: `submit`, `watch`, `pipeline`, `inflight`,
`images` (see each module's docstring for what it measures and why it measures it that way).
"""

from __future__ import annotations
