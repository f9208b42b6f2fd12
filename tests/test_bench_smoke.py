"""The benchmark suite still runs: every scenario at smoke sizes (about a second each), figures only.

No timing is asserted here (speed is measured by `make bench`, not judged by the tests); each scenario
must finish and produce each of its figures as a number. pgqueuer's baseline is left out when pgqueuer
is not installed (it comes with the `bench` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("submit", "watch", "pipeline", "inflight", "images")
#: figures whose baseline comes from an optional package
OPTIONAL_BASELINES = {
    ("pipeline", "completed jobs/s, one process"),
    ("pipeline", "service CPU per completed job"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of every scenario (a child process, as `make bench` runs it)."""
    output = tmp_path_factory.mktemp("bench") / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(output.read_text())
    return result


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_scenario_produces_its_figures(report: dict[str, Any], scenario: str) -> None:
    entry = report["scenarios"][scenario]
    assert "error" not in entry, entry.get("error")
    assert entry["figures"], f"{scenario} produced no figures"
    for figure in entry["figures"]:
        value = figure["value"]
        assert isinstance(value, int | float) and math.isfinite(value), figure
        if figure["baseline_label"] and (scenario, figure["figure"]) not in OPTIONAL_BASELINES:
            assert isinstance(figure["baseline"], int | float), figure
        if figure["target"] is not None:
            optional = (scenario, figure["figure"]) in OPTIONAL_BASELINES and figure["baseline"] is None
            # without its optional baseline a ratio target cannot be judged, and says so (None)
            assert figure["met"] in ((True, False, None) if optional else (True, False)), figure


@pytest.mark.timeout(180)
def test_pgqueuer_baseline_runs_when_installed(report: dict[str, Any]) -> None:
    pipeline = report["scenarios"]["pipeline"]
    throughput = next(f for f in pipeline["figures"] if f["figure"] == "completed jobs/s, one process")
    if importlib.util.find_spec("pgqueuer") is None:
        assert throughput["baseline"] is None
        pytest.skip("pgqueuer is not installed: pip install '.[bench]'")
    assert isinstance(throughput["baseline"], int | float) and throughput["baseline"] > 0


@pytest.mark.timeout(180)
def test_the_report_describes_the_machine(report: dict[str, Any]) -> None:
    machine = report["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["postgresql"]
    assert report["quick"] is True and report["timestamp"]
