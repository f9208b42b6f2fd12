"""The container image and the Kubernetes manifests, checked offline.

`kubectl kustomize` renders the base and the example overlay (once each), `kubernetes-validate --strict`
validates every built-in object (once), the custom resources (KEDA, Prometheus Operator) are validated
against the minimal schemas in tests/k8s_schemas, hadolint lints the Dockerfile, and the API and worker
containers are started as processes with the command, environment, files and ports the manifests and the
image give them. No container runtime or cluster is available here, so that is as close as it gets.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from referencing import Registry, Resource
from sqlalchemy import text

from server.app import vendor_caps
from server.health import SERVICE_NAME
from server.settings import Settings
from storage.backlog import claimable_sql
from storage.db import make_engine
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
TREES = {"base": DEPLOY / "base", "example": DEPLOY / "overlays" / "example"}
SCHEMAS = Path(__file__).with_name("k8s_schemas")
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def _tool(name: str) -> str:
    """A tool the dev extra installs beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is missing: install the dev extra (make venv)")
    return str(path)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every object of each kustomization, as `kubectl kustomize` renders it."""
    objects = {}
    for name, tree in TREES.items():
        run = subprocess.run(
            [_tool("kubectl"), "kustomize", str(tree)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        objects[name] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return objects


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def _data(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or a Secret's data, decoded."""
    if obj["kind"] == "Secret":
        return {key: base64.b64decode(value).decode() for key, value in obj.get("data", {}).items()}
    return dict(obj.get("data", {}))


def _container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom in order, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_data(_one(objects, "ConfigMap", source["configMapRef"]["name"])))
        elif objects_of := [o for o in objects if o["metadata"]["name"] == source["secretRef"]["name"]]:
            env.update(_data(_one(objects_of, "Secret")))
        # else: the base leaves the Secrets to an overlay
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def _image() -> dict[str, Any]:
    """The final stage of the Dockerfile: its ENV, ENTRYPOINT, CMD, USER and instructions."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    final = lines[stages[-1] :]
    build = lines[stages[0] : stages[-1]]
    image: dict[str, Any] = {
        "env": {},
        "final": final,
        "build": build,
        "instructions": [line.split()[0].upper() for line in final],
    }
    image["from"] = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    args = {
        key: value
        for line in lines[: stages[0]]
        if line.upper().startswith("ARG ")
        for key, _, value in [line[4:].partition("=")]
    }
    image["args"] = args
    for line in final:
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                image["env"][key] = value
        elif keyword.upper() in ("ENTRYPOINT", "CMD"):
            image[keyword.lower()] = json.loads(rest)
        elif keyword.upper() in ("USER", "WORKDIR"):
            image[keyword.lower()] = rest
    return image


# ------------------------------------------------------------------ validation


def test_every_builtin_object_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    files = []
    for name, objects in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        files.append(str(path))
    run = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True, timeout=120
    )
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and not [line for line in lines if not line.startswith(("INFO", "WARN"))], (
        run.stdout + run.stderr
    )
    builtin = sum(o["kind"] not in CUSTOM_KINDS for objects in rendered.values() for o in objects)
    assert sum(" passed for resource " in line for line in lines) == builtin
    # the only kinds it has no schema for are the custom resources validated below
    unknown = {line.split(" for kind ")[1].split()[0] for line in lines if line.startswith("WARN")}
    assert unknown == CUSTOM_KINDS


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    documents = [json.loads(path.read_text()) for path in SCHEMAS.glob("*.json")]
    registry: Registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents
    )
    return {
        doc["properties"]["kind"]["const"]: jsonschema.Draft202012Validator(doc, registry=registry)
        for doc in documents
        if "kind" in doc.get("properties", {})
    }


def test_custom_resources_validate_against_their_crd_schemas(
    rendered: dict[str, list[dict[str, Any]]], crd_validators: dict[str, Any]
) -> None:
    assert set(crd_validators) == CUSTOM_KINDS
    for objects in rendered.values():
        assert {o["kind"] for o in objects} >= CUSTOM_KINDS
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                crd_validators[obj["kind"]].validate(obj)
    # strict: a misspelt field is refused, as a cluster validating strictly would refuse it
    scaled = copy.deepcopy(_one(rendered["example"], "ScaledObject"))
    scaled["spec"]["cooldownPeriods"] = 600
    with pytest.raises(jsonschema.ValidationError, match="cooldownPeriods"):
        crd_validators["ScaledObject"].validate(scaled)


def test_the_dockerfile_passes_hadolint() -> None:
    run = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_is_slim_python_non_root_and_has_no_healthcheck() -> None:
    image = _image()
    assert image["args"]["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert len(image["from"]) >= 2  # a build stage; the final stage copies only the installed env
    assert image["user"].split(":")[0] not in ("", "0", "root")
    assert "HEALTHCHECK" not in image["instructions"]
    # nothing is built or installed in the final stage: no package manager, compiler or pip run there
    building = ("apt-get install", "apk add", "pip install", "gcc", "build-essential", "COPY . ")
    assert not [line for line in image["final"] if any(word in line for word in building)]
    assert image["entrypoint"] + image["cmd"] == ["python", "-m", "server", "serve"]
    # the build context and the build stage hold every package the project installs, and only those
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in dockerignore and "!.venv" not in dockerignore
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {line.split()[1].rstrip("/") for line in image["build"] if line.startswith("COPY ")}
    assert copied - {"pyproject.toml"} == packages
    assert {line[1:].rstrip("/") for line in dockerignore if line.startswith("!")} == packages | {
        "pyproject.toml"
    }


# ------------------------------------------------------------------ the manifests' own rules


@pytest.mark.parametrize("tree", list(TREES))
def test_termination_grace_outlasts_the_shutdown_grace_and_the_prestop_delay(
    rendered: dict[str, list[dict[str, Any]]], tree: str
) -> None:
    objects = rendered[tree]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"imagegen-api", "imagegen-worker"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        settings = Settings.from_env(_container_env(objects, container) | {"IMAGEGEN_DATA_DIR": "/tmp"})
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s + pre_stop
        if settings.role == "worker":
            # a synchronous vendor call running at SIGTERM gets to finish
            assert settings.shutdown_grace_s > settings.provider_timeout_s
        else:
            assert settings.role == "api" and pre_stop > 0


def test_probes_ask_the_health_service_and_the_process(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["example"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        container = _container(deployment)
        env = _container_env(objects, container)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["grpc"] == int(env["IMAGEGEN_GRPC_ADDRESS"].rsplit(":", 1)[1])
        assert ports["http"] == int(env["IMAGEGEN_HTTP_ADDRESS"].rsplit(":", 1)[1])
        readiness = container["readinessProbe"]["grpc"]
        assert readiness["port"] == ports["grpc"]
        assert readiness.get("service", "") in ("", SERVICE_NAME)
        # liveness must not follow the database (the gRPC health does): /healthz is the process alone
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ports["http"]}
        assert env["IMAGEGEN_ROLE"] == deployment["metadata"]["name"].removeprefix("imagegen-")
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            d for d in objects if d["kind"] == "Deployment" and _selects(selector, d["spec"]["template"])
        ]
        assert targets, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in {p["name"] for p in _container(d)["ports"]} for d in targets)


def _selects(selector: dict[str, str], template: dict[str, Any]) -> bool:
    return bool(selector.items() <= template["metadata"]["labels"].items())


def test_every_pod_runs_non_root_with_requests_limits_and_the_same_image(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["example"]
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3
    images = set()
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            images.add(container["image"])
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert images == {"registry.example.com/platform/imagegen:0.1.0"}
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert [d for d in objects if d["kind"] == "Deployment" and _selects_pdb(pdb, d)]
    covered = [
        d
        for d in objects
        if d["kind"] in ("Deployment", "Job")
        for policy in objects
        if policy["kind"] == "NetworkPolicy"
        and policy["spec"]["podSelector"]["matchLabels"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(covered) == 3


def _selects_pdb(pdb: dict[str, Any], deployment: dict[str, Any]) -> bool:
    return _selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"])


def test_the_migration_job_runs_the_image_migrate_with_the_services_settings(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["example"]
    job = _one(objects, "Job", "imagegen-migrate")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert "command" not in container and container["args"] == ["migrate"]
    assert _image()["entrypoint"] + container["args"] == ["python", "-m", "server", "migrate"]
    api = _container(_one(objects, "Deployment", "imagegen-api"))
    assert container["envFrom"] == api["envFrom"] and container["image"] == api["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_secrets_hold_what_several_machines_need(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["example"]
    secrets = {o["metadata"]["name"].rsplit("-", 1)[0]: _data(o) for o in objects if o["kind"] == "Secret"}
    assert {
        "IMAGEGEN_DATABASE_URL",
        "IMAGEGEN_URL_SIGNING_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "BFL_API_KEY",
        "OPENAI_API_KEY",
        "ARK_API_KEY",
        "GEMINI_API_KEY",
    } <= secrets["imagegen-secrets"].keys()
    json.loads(secrets["imagegen-tokens"]["tokens.json"])["callers"][0]["token_sha256"]
    config = _data(next(o for o in objects if o["kind"] == "ConfigMap"))
    assert config["IMAGEGEN_BLOB_URL"].startswith("s3://")
    assert not {"AWS_SECRET_ACCESS_KEY", "IMAGEGEN_URL_SIGNING_KEY", "IMAGEGEN_DATABASE_URL"} & config.keys()
    mounts = {m["mountPath"] for m in _container(_one(objects, "Deployment", "imagegen-api"))["volumeMounts"]}
    assert str(Path(config["IMAGEGEN_AUTH_TOKENS_FILE"]).parent) in mounts


def test_the_prometheus_rule_is_alerts_yml(rendered: dict[str, list[dict[str, Any]]]) -> None:
    alerts = yaml.safe_load((ROOT / "server" / "operations" / "alerts.yml").read_text())
    for objects in rendered.values():
        rule = _one(objects, "PrometheusRule")
        assert rule["spec"]["groups"] == alerts["groups"], (
            "deploy/kubernetes/base/prometheusrule.yaml differs from server/operations/alerts.yml: "
            "run `make manifests`"
        )


def test_the_service_monitor_scrapes_every_replica_as_job_imagegen(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["example"]
    monitor = _one(objects, "ServiceMonitor")
    [service] = [
        s
        for s in objects
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "imagegen"  # alerts use job=
    assert service["spec"]["clusterIP"] == "None"  # one target per pod
    scraped = [
        d
        for d in objects
        if d["kind"] == "Deployment" and _selects(service["spec"]["selector"], d["spec"]["template"])
    ]
    assert len(scraped) == 2
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("tree", list(TREES))
async def test_the_workers_scale_on_the_backlog_query_for_their_own_caps(
    rendered: dict[str, list[dict[str, Any]]], tree: str, database_url: str
) -> None:
    objects = rendered[tree]
    scaled = _one(objects, "ScaledObject")
    worker = _one(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    env = _container_env(objects, _container(worker))
    settings = Settings.from_env(env | {"IMAGEGEN_DATA_DIR": "/tmp"})
    assert settings.role == "worker"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert "replicas" not in worker["spec"]  # the autoscaler's to set
    expected = claimable_sql(
        vendor_caps(settings), per_account=settings.max_in_flight_per_account, with_processing=True
    )
    assert trigger["metadata"]["query"].strip() == expected, (
        "the ScaledObject's query is not `python -m server backlog --sql --with-processing` for the "
        "workers' settings: run `make manifests` (or patch the overlay's query)"
    )
    # a worker's share of the demand fits in its slots; scaling to zero waits out a whole job
    assert 0 < float(trigger["metadata"]["targetQueryValue"]) <= settings.worker_concurrency
    assert float(trigger["metadata"]["activationTargetQueryValue"]) >= 0
    assert scaled["spec"]["cooldownPeriod"] >= settings.job_deadline_s
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] >= settings.shutdown_grace_s
    # KEDA connects with the workers' own database URL
    auth = _one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection" and ref["key"] == "IMAGEGEN_DATABASE_URL"
    secret_refs = [s["secretRef"]["name"] for s in _container(worker)["envFrom"] if "secretRef" in s]
    assert secret_refs == [ref["name"]]
    # and the statement runs on the real schema, answering one number
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text(trigger["metadata"]["query"]))).scalar_one() == 0
    finally:
        await engine.dispose()


# ------------------------------------------------------------------ the containers, as processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Container:
    """One container of a rendered Deployment, run as a local process."""

    def __init__(self, objects: list[dict[str, Any]], deployment: dict[str, Any], root: Path) -> None:
        spec = deployment["spec"]["template"]["spec"]
        self.container = _container(deployment)
        image = _image()
        command = self.container.get("command", image["entrypoint"]) + self.container.get(
            "args", image["cmd"]
        )
        assert command[0] == "python"  # the image's interpreter: here, this one
        self.argv = [sys.executable, *command[1:]]
        # the files Kubernetes mounts, at paths under `root`
        self.paths: dict[str, Path] = {}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in self.container["volumeMounts"]:
            local = root / mount["mountPath"].strip("/")
            local.mkdir(parents=True)
            volume = volumes[mount["name"]]
            if "secret" in volume:
                for key, value in _data(_one(objects, "Secret", volume["secret"]["secretName"])).items():
                    (local / key).write_text(value)
            else:
                assert "emptyDir" in volume
            self.paths[mount["mountPath"]] = local
        self.env = {**image["env"], **_container_env(objects, self.container)}
        self.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        for key, value in list(self.env.items()):
            for mount_path, local in self.paths.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    self.env[key] = str(local) + value[len(mount_path) :]
        # free ports instead of the fixed ones (other processes on this machine may hold them), on the
        # host the manifests give
        self.ports = {}
        for name, variable in (("grpc", "IMAGEGEN_GRPC_ADDRESS"), ("http", "IMAGEGEN_HTTP_ADDRESS")):
            host, port = self.env[variable].rsplit(":", 1)
            assert int(port) == next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)
            self.ports[name] = _free_port()
            self.env[variable] = f"{host}:{self.ports[name]}"
        self.workdir = self.paths[image["workdir"]]  # the image's WORKDIR, a mounted volume
        self.grace_s = spec["terminationGracePeriodSeconds"]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, database_url: str, s3: dict[str, str]) -> None:
        # the services outside the pod: the secret's placeholder URL → the test database; the bucket and
        # its credentials → the tests' S3 server, where there is one
        self.env["IMAGEGEN_DATABASE_URL"] = database_url
        self.env.update(s3)
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=self.workdir,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )

    async def serving(self, service: str) -> bool:
        assert self.process is not None and self.process.returncode is None, "the process exited"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['grpc']}") as channel:
            try:
                # the health stub is typed for sync channels only
                answer = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def get(self, path: str) -> int:
        url = f"http://127.0.0.1:{self.ports['http']}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status

    async def stop(self) -> tuple[int | None, str]:
        """SIGTERM, as the kubelet sends it, and the exit code within the pod's termination grace."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = await asyncio.wait_for(self.process.communicate(), timeout=self.grace_s)
        except TimeoutError:
            self.process.kill()
            _, stderr = await self.process.communicate()
        return self.process.returncode, stderr.decode(errors="replace")


@pytest.fixture
async def containers(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> AsyncIterator[dict[str, _Container]]:
    objects = rendered["example"]
    made = {
        name: _Container(objects, _one(objects, "Deployment", f"imagegen-{name}"), tmp_path / name)
        for name in ("api", "worker")
    }
    yield made
    for container in made.values():
        if container.process is not None and container.process.returncode is None:
            container.process.kill()
            await container.process.communicate()


async def test_the_api_and_worker_containers_serve_as_the_manifests_configure_them(
    containers: dict[str, _Container], database_url: str, request: pytest.FixtureRequest
) -> None:
    try:
        s3 = request.getfixturevalue("s3_server").env(f"deploy-{os.getpid()}")
    except pytest.FixtureLookupError:  # a build whose images are on local disk only
        s3 = {}
    for container in containers.values():
        await container.start(database_url, s3)
    for container in containers.values():
        probe = container.container["readinessProbe"]["grpc"].get("service", "")
        await eventually(functools.partial(container.serving, probe), timeout=30, interval=0.2)
        assert await container.get("/readyz") == 200
        assert await container.get(container.container["livenessProbe"]["httpGet"]["path"]) == 200
    # the API serves the API; the worker only health (its role runs no ImageGeneration service)
    api, worker = containers["api"], containers["worker"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.ports['grpc']}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            list_jobs: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/imagegen.v1.ImageGeneration/ListJobs"
            )
            await list_jobs(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # tokens file mounted and read
    for container in (api, worker):
        code, stderr = await container.stop()
        assert code == 0, stderr[-2000:]


def test_the_readmes_first_rollout_step_applies_the_migration_without_the_deployments(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    # deploy/README.md: kubectl apply -f imagegen.yaml -l 'app.kubernetes.io/component notin (api,worker)'
    # (a `notin` selector also takes the objects without the label)
    objects = rendered["example"]
    first = {
        (
            o["kind"],
            o["metadata"]["name"].rsplit("-", 1)[0]
            if o["kind"] in ("ConfigMap", "Secret")
            else o["metadata"]["name"],
        )
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in ("api", "worker")
    }
    assert {
        ("Namespace", "imagegen"),
        ("ServiceAccount", "imagegen"),
        ("ConfigMap", "imagegen-config"),
        ("Secret", "imagegen-secrets"),
        ("Secret", "imagegen-tokens"),
        ("Job", "imagegen-migrate"),
    } <= first
    assert not {kind for kind, _ in first} & {"Deployment", "ScaledObject"}
