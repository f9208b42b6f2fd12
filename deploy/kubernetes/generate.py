"""Write the base's generated files from their one source (`make manifests`; `make test` checks them).

- base/prometheusrule.yaml: server/operations/alerts.yml's groups, as a Prometheus Operator resource;
- base/backlog.sql: the worker autoscaler's query (`python -m server backlog --sql --with-processing`)
  for the caps the base's ConfigMap sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from server.app import vendor_caps
from server.settings import Settings
from storage.backlog import claimable_sql

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
ALERTS = ROOT / "server" / "operations" / "alerts.yml"

RULE_HEADER = """\
# GENERATED from server/operations/alerts.yml by `make manifests`: edit that file, not this one.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imagegen
spec:
"""


def prometheus_rule() -> str:
    """alerts.yml's text from its `groups:` on, under `spec:` (its comments and layout kept)."""
    lines = ALERTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    return RULE_HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


def config_literals() -> dict[str, str]:
    """The base ConfigMap's settings, as the containers get them."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    [config] = [g for g in kustomization["configMapGenerator"] if g["name"] == "imagegen-config"]
    return dict(literal.split("=", 1) for literal in config["literals"])


def backlog_query(env: dict[str, str]) -> str:
    """The autoscaler's statement for the caps the environment `env` sets."""
    settings = Settings.from_env({key: value for key, value in env.items() if "ADDRESS" not in key})
    return claimable_sql(
        vendor_caps(settings), per_account=settings.max_in_flight_per_account, with_processing=True
    )


def main() -> int:
    (BASE / "prometheusrule.yaml").write_text(prometheus_rule())
    (BASE / "backlog.sql").write_text(backlog_query(config_literals()) + "\n")
    print(f"wrote {BASE / 'prometheusrule.yaml'} and {BASE / 'backlog.sql'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
