"""deploy/k8s: the kustomize overlays render, validate offline and agree with the CLI.

Rendering uses tests/kustomize_lite.py (and ``kustomize build`` or ``kubectl kustomize``
too where one is installed, which must give the same objects). Built-in kinds are
validated with kubernetes-validate (strict: unknown fields fail) at the oldest and the
newest Kubernetes version this deployment targets; the custom resources (KEDA, Strimzi,
Prometheus Operator) against small hand-written schemas of the fields used. The drift
checks hold the manifests to worker/cli/main.py, worker/ops/http.py and worker/ops/metrics.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.cli.main import build_parser
from worker.config import SASL_PASSWORD_ENV, check_unknown_env
from worker.ops.http import ProbeServer
from worker.ops.metrics import PoolMetrics, WorkerMetrics

from kustomize_lite import KustomizeError, build, json6902, load_documents, split_image
from kustomize_lite import strategic_merge as smp

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu")
#: The oldest Kubernetes the manifests target (podFailurePolicy, unhealthyPodEvictionPolicy
#: are GA there) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
PARTS_PER_EVENT = 3  # image, text, audio: the reference model's inputs
#: Metrics the dashboard and alerts use that the worker does not export.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "kafka_consumergroup_lag": "Strimzi's Kafka Exporter",
}
WORKER_ROUTES = ("/healthz", "/readyz", "/metrics")
#: The worker's --sasl-mechanism as KEDA's kafka scaler names it.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
Obj = dict[str, Any]


# ------------------------------------------------------------------ rendering


@functools.cache
def render(path: str) -> tuple[Obj, ...]:
    """The rendered objects of a kustomization under deploy/k8s (cached, do not mutate)."""
    return tuple(build(K8S / path))


def render_variant(tmp_path: Path, resources: list[str], components: list[str]) -> list[Obj]:
    """A kustomization in ``tmp_path`` over deploy/k8s directories (relative paths:
    kustomize refuses absolute ones)."""
    rel = [os.path.relpath(K8S / p, tmp_path) for p in resources + components]
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": rel[: len(resources)],
                "components": rel[len(resources) :],
            }
        )
    )
    return build(tmp_path)


def only(objs: Any, kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def documents(name: str) -> list[Obj]:
    return load_documents(K8S / name)


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: Obj = spec["template"]["spec"]
    return template


def container(obj: Obj) -> Obj:
    containers: list[Obj] = pod_spec(obj)["containers"]
    assert len(containers) == 1
    return containers[0]


def workloads() -> Iterator[tuple[str, Obj]]:
    """Every pod-running object: the overlays' Deployments and the replay Job/CronJob."""
    for overlay in OVERLAYS:
        yield f"overlays/{overlay}", only(render(f"overlays/{overlay}"), "Deployment")
    for name in ("jobs/replay-job.yaml", "jobs/replay-cronjob.yaml"):
        yield name, only(documents(name), "Job" if "cronjob" not in name else "CronJob")


def config_map() -> dict[str, str]:
    return dict(only(render("base"), "ConfigMap")["data"])


def pod_env(obj: Obj, config: dict[str, str]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (env wins over envFrom);
    values from Secrets and the downward API become placeholders."""
    c = container(obj)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"] == "mmstream-worker-config"
        env.update(config)
    for var in c.get("env", []):
        env[var["name"]] = var.get("value", f"<{var['name']} from valueFrom>")
    return env


@functools.cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser({})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def env_names(command: str) -> set[str]:
    """The ``[env: NAME]`` variables in ``mmstream COMMAND --help``."""
    helps = " ".join(a.help or "" for a in subcommands()[command]._actions)
    names = set(re.findall(r"\[env: (MMSTREAM_[A-Z0-9_]+)\]", helps))
    assert names, command
    return names | {SASL_PASSWORD_ENV}


def flags(command: str) -> set[str]:
    return {s for a in subcommands()[command]._actions for s in a.option_strings}


def parse_with_env(command: str, env: dict[str, str], argv: list[str]) -> argparse.Namespace:
    """What ``mmstream`` itself makes of this environment and these arguments."""
    mm = {k: v for k, v in env.items() if k.startswith("MMSTREAM_")}
    parser = build_parser(mm)
    args = parser.parse_args(argv)
    check_unknown_env(args.known_env, mm)
    assert args.command == command
    return args


def processes(deployment: Obj) -> int:
    env = {e["name"]: e.get("value") for e in container(deployment).get("env", [])}
    return int(env.get("MMSTREAM_PROCESSES") or 1)


def kafka_topics() -> dict[str, Obj]:
    return {t["spec"].get("topicName", t["metadata"]["name"]): t for t in render("kafka")}


# ------------------------------------------------------------------ the loader


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.parametrize(
    "variant",
    [
        (["overlays/gpu"], []),
        (["overlays/cpu"], []),
        (["base"], []),
        (["kafka"], []),
        (["overlays/gpu"], ["components/monitoring", "components/model-image-volume"]),
        (["base"], ["components/hpa"]),
    ],
    ids=["gpu", "cpu", "base", "kafka", "gpu+monitoring+image-volume", "base+hpa"],
)
def test_loader_matches_real_kustomize(
    tmp_path: Path, variant: tuple[list[str], list[str]]
) -> None:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: tests/kustomize_lite.py alone")
    ours = render_variant(tmp_path, *variant)
    out = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert sorted(ours, key=_key) == sorted(theirs, key=_key)


def test_loader_strategic_merge() -> None:
    base: Obj = {
        "a": {"keep": 1, "drop": 2},
        "containers": [{"name": "w", "env": [{"name": "A", "value": "1"}], "image": "x"}],
        "args": ["x", "y"],
    }
    smp(
        base,
        {
            "a": {"drop": None},
            "containers": [{"name": "w", "env": [{"name": "B", "value": "2"}]}],
            "args": ["z"],
        },
        keyed=True,
    )
    assert base["a"] == {"keep": 1}
    assert base["containers"][0]["env"] == [
        {"name": "B", "value": "2"},
        {"name": "A", "value": "1"},
    ]
    assert base["containers"][0]["image"] == "x"
    assert base["args"] == ["z"]  # no merge key: replaced
    custom: Obj = {"triggers": [{"type": "kafka", "metadata": {"a": "1"}}]}
    smp(custom, {"triggers": [{"type": "kafka"}]}, keyed=False)
    assert custom == {"triggers": [{"type": "kafka"}]}  # custom resources: lists replaced


def test_loader_json6902() -> None:
    obj: Obj = {"metadata": {"annotations": {"a/b": "1"}}, "spec": {"l": [1, 2]}}
    json6902(
        obj,
        [
            {"op": "replace", "path": "/metadata/annotations/a~1b", "value": "2"},
            {"op": "add", "path": "/spec/l/-", "value": 3},
            {"op": "add", "path": "/spec/l/0", "value": 0},
            {"op": "remove", "path": "/spec/l/1"},
            {"op": "add", "path": "/spec/new", "value": {"x": 1}},
        ],
    )
    assert obj == {
        "metadata": {"annotations": {"a/b": "2"}},
        "spec": {"l": [0, 2, 3], "new": {"x": 1}},
    }
    with pytest.raises(KustomizeError):
        json6902(obj, [{"op": "replace", "path": "/spec/missing", "value": 1}])
    with pytest.raises(KustomizeError):
        json6902(obj, [{"op": "move", "from": "/spec/l", "path": "/spec/m"}])


def test_loader_images_and_refusals(tmp_path: Path) -> None:
    assert split_image("registry:5000/team/app:1.2@sha256:ab") == (
        "registry:5000/team/app",
        "1.2",
        "sha256:ab",
    )
    assert split_image("registry:5000/app") == ("registry:5000/app", "", "")
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: []\n")
    with pytest.raises(KustomizeError, match="unsupported field"):
        build(tmp_path)


# ------------------------------------------------------------------ schemas

_STR = {"type": "string"}
_INT = {"type": "integer"}
_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
}


def _crd(api_version: str, kind: str, spec: Obj) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


def _obj(required: list[str], props: Obj) -> Obj:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": props,
    }


_HPA_POLICY = _obj(
    ["type", "value", "periodSeconds"],
    {"type": {"enum": ["Pods", "Percent"]}, "value": _INT, "periodSeconds": _INT},
)
_HPA_RULES = _obj(
    ["policies"],
    {
        "stabilizationWindowSeconds": _INT,
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": _HPA_POLICY},
    },
)
#: The fields of the custom resources as this deployment uses them (KEDA 2.x kafka scaler,
#: Strimzi >= 0.49, Prometheus Operator v1): a typo or a misplaced field fails.
CRD_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _obj(
            ["scaleTargetRef", "triggers"],
            {
                "scaleTargetRef": _obj(["name"], {"name": _STR}),
                "pollingInterval": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "advanced": _obj(
                    [],
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _obj(
                            ["behavior"],
                            {
                                "behavior": _obj(
                                    [], {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES}
                                )
                            },
                        ),
                    },
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        ["type", "metadata"],
                        {
                            "type": {"const": "kafka"},
                            "metadata": {
                                "type": "object",
                                "required": ["bootstrapServers", "consumerGroup", "topic"],
                                "additionalProperties": False,
                                # KEDA reads every value as a string.
                                "properties": {
                                    k: _STR
                                    for k in [
                                        "bootstrapServers",
                                        "consumerGroup",
                                        "topic",
                                        "lagThreshold",
                                        "activationLagThreshold",
                                        "offsetResetPolicy",
                                        "allowIdleConsumers",
                                        "excludePersistentLag",
                                        "scaleToZeroOnInvalidOffset",
                                        "limitToPartitionsWithLag",
                                        "sasl",
                                        "tls",
                                        "unsafeSsl",
                                    ]
                                },
                            },
                            "authenticationRef": _obj(["name"], {"name": _STR}),
                        },
                    ),
                },
            },
        ),
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _obj(
            ["secretTargetRef"],
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _obj(
                        ["parameter", "name", "key"],
                        {
                            "parameter": {"enum": ["username", "password", "ca", "cert", "key"]},
                            "name": _STR,
                            "key": _STR,
                        },
                    ),
                }
            },
        ),
    ),
    ("kafka.strimzi.io/v1", "KafkaTopic"): _crd(
        "kafka.strimzi.io/v1",
        "KafkaTopic",
        _obj(
            ["partitions", "replicas"],
            {
                "topicName": _STR,
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1},
                "config": {"type": "object", "additionalProperties": _STR},
            },
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _obj(
            ["selector", "endpoints"],
            {
                "selector": _obj(["matchLabels"], {"matchLabels": {"type": "object"}}),
                "endpoints": {
                    "type": "array",
                    "items": _obj(["port"], {"port": _STR, "path": _STR, "interval": _STR}),
                },
            },
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            ["groups"],
            {
                "groups": {
                    "type": "array",
                    "items": _obj(
                        ["name", "rules"],
                        {
                            "name": _STR,
                            "rules": {
                                "type": "array",
                                "items": _obj(
                                    ["alert", "expr"],
                                    {
                                        "alert": _STR,
                                        "expr": _STR,
                                        "for": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                        "labels": {"type": "object", "additionalProperties": _STR},
                                        "annotations": {
                                            "type": "object",
                                            "additionalProperties": _STR,
                                        },
                                    },
                                ),
                            },
                        },
                    ),
                }
            },
        ),
    ),
}


def validate(obj: Obj) -> None:
    schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(obj)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def every_object() -> Iterator[tuple[str, Obj]]:
    for path in ("overlays/gpu", "overlays/cpu", "kafka"):
        for obj in render(path):
            yield path, obj
    for name in ("jobs/replay-job.yaml", "jobs/replay-cronjob.yaml", "secret.example.yaml"):
        for obj in documents(name):
            yield name, obj
    for component in ("monitoring", "hpa", "model-image-volume"):
        for obj in build_component(component):
            yield f"components/{component}", obj


@functools.cache
def build_component(name: str) -> tuple[Obj, ...]:
    """The gpu overlay with one more component (or, for hpa, base + hpa), new objects
    and the Deployment only."""
    with tempfile.TemporaryDirectory() as tmp:
        resources = ["base"] if name == "hpa" else ["overlays/gpu"]
        objs = render_variant(Path(tmp), resources, [f"components/{name}"])
    gpu = {_key(o) for o in render("overlays/gpu")}
    return tuple(o for o in objs if _key(o) not in gpu or o["kind"] == "Deployment")


def test_every_object_validates() -> None:
    seen: set[str] = set()
    for where, obj in every_object():
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        seen.add(obj["kind"])
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "KafkaTopic",
        "Job",
        "CronJob",
        "ServiceMonitor",
        "PrometheusRule",
        "Secret",
    } <= seen


def test_validation_is_strict() -> None:
    deployment = json.loads(json.dumps(only(render("overlays/cpu"), "Deployment")))
    container(deployment)["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = json.loads(json.dumps(only(render("overlays/cpu"), "ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


# ------------------------------------------------------------------ CLI drift


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_environment_is_what_the_cli_reads(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    deployment = only(objs, "Deployment")
    c = container(deployment)
    assert c["args"] == ["worker"] and "command" not in c
    env = pod_env(deployment, dict(only(objs, "ConfigMap")["data"]))
    mm = {k for k in env if k.startswith("MMSTREAM_")}
    assert mm <= env_names("worker"), mm - env_names("worker")
    args = parse_with_env("worker", env, c["args"])
    assert args.http_port == 8080 and args.log_format == "json"
    assert str(args.model) == "/models/current"
    assert args.group_instance_id.startswith("<")  # from the pod name (downward API)
    fields = {e["name"]: e.get("valueFrom", {}) for e in c["env"]}
    assert fields["MMSTREAM_GROUP_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert args.processes == processes(deployment)
    assert args.device == {"gpu": "cuda", "cpu": "cpu"}[overlay]


def test_config_map_keys_are_worker_flags() -> None:
    keys = set(config_map())
    assert keys <= env_names("worker"), keys - env_names("worker")
    assert SASL_PASSWORD_ENV not in keys  # the secret lives in the Secret
    for var in ("MMSTREAM_BOOTSTRAP_SERVERS", "MMSTREAM_INPUT_TOPIC", "MMSTREAM_GROUP_ID"):
        assert var in keys
    assert config_map()["MMSTREAM_MODEL"] == "/models/current"


@pytest.mark.parametrize("name", ["jobs/replay-job.yaml", "jobs/replay-cronjob.yaml"])
def test_replay_environment_is_what_the_cli_reads(name: str, tmp_path: Path) -> None:
    job = only(documents(name), "CronJob" if "cronjob" in name else "Job")
    c = container(job)
    config = config_map()
    env = pod_env(job, config)
    own = {e["name"] for e in c["env"]}
    assert own <= env_names("replay"), own - env_names("replay")
    if "command" in c:  # the CronJob computes its window, then execs mmstream replay
        argv = run_with_fake_mmstream(c["command"], tmp_path)
        assert argv[:1] == ["replay"]
        assert {a for a in argv if a.startswith("--")} <= flags("replay")
    else:
        argv = c["args"]
        assert argv == ["replay"]
    args = parse_with_env("replay", env, argv)
    # Never the live topics: env overrides the ConfigMap's.
    assert args.output_topic not in (
        config["MMSTREAM_OUTPUT_TOPIC"],
        config["MMSTREAM_INPUT_TOPIC"],
    )
    assert args.dlq_topic and args.dlq_topic != config["MMSTREAM_DLQ_TOPIC"]
    assert args.source_topic == config["MMSTREAM_INPUT_TOPIC"]
    assert getattr(args, "from") and args.to
    assert args.bootstrap_servers == config["MMSTREAM_BOOTSTRAP_SERVERS"]
    assert str(args.model) == config["MMSTREAM_MODEL"]
    # The Kafka security reaches the replay too (same ConfigMap and Secret).
    assert args.security_protocol == config["MMSTREAM_SECURITY_PROTOCOL"]
    assert args.sasl_mechanism == config["MMSTREAM_SASL_MECHANISM"]
    assert args.sasl_username.startswith("<")
    for topic in (args.output_topic, args.dlq_topic):
        assert topic in kafka_topics(), f"no KafkaTopic for {topic}"


def run_with_fake_mmstream(command: list[str], tmp_path: Path) -> list[str]:
    """Run the container's command with ``python3`` = this interpreter and an ``mmstream``
    that prints its arguments; returns them."""
    fake = tmp_path / "mmstream"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    assert command[0] == "python3"
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    argv: list[str] = json.loads(out.stdout)
    return argv


def test_shutdown_fits_in_the_grace_period() -> None:
    for where, obj in workloads():
        grace = pod_spec(obj)["terminationGracePeriodSeconds"]
        env = pod_env(obj, config_map())
        timeout = float(env.get("MMSTREAM_SHUTDOWN_TIMEOUT_S", 30.0))
        # The drain waits up to the timeout, then commits and closes: leave room for that.
        assert grace >= timeout + 15, where


# ------------------------------------------------------------------ HTTP: probes, metrics


def http_port(deployment: Obj) -> int:
    """The pod's one HTTP port, as the worker parses its environment: ``--http-port``
    (with ``--processes N`` the launcher serves it for all N, worker/ops/processes.py)."""
    args = parse_with_env(
        "worker", pod_env(deployment, config_map()), container(deployment)["args"]
    )
    port: int = args.http_port
    return port


def probe_target(probe: Obj, named_ports: dict[str, int]) -> tuple[str, int]:
    """(path, port) of a probe, which must be a plain-HTTP ``httpGet``."""
    handlers = [k for k in ("httpGet", "exec", "tcpSocket", "grpc") if k in probe]
    assert handlers == ["httpGet"], handlers
    get = probe["httpGet"]
    assert get.get("scheme", "HTTP") == "HTTP" and "host" not in get
    port = get["port"]
    return get["path"], named_ports[port] if isinstance(port, str) else port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_port_serves_probes_and_metrics(overlay: str, tmp_path: Path) -> None:
    objs = render(f"overlays/{overlay}")
    deployment = only(objs, "Deployment")
    c = container(deployment)
    port = http_port(deployment)
    assert port > 0
    # One port per pod, whatever MMSTREAM_PROCESSES (4 in the gpu overlay).
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe_target(c["livenessProbe"], named) == ("/healthz", port)
    assert probe_target(c["readinessProbe"], named) == ("/readyz", port)
    if "startupProbe" in c:
        path, probed = probe_target(c["startupProbe"], named)
        assert path in WORKER_ROUTES and probed == port
    # A stuck loop restarts the container, but not before it had its stall window.
    env = pod_env(deployment, config_map())
    stall_s = float(env.get("MMSTREAM_STALL_TIMEOUT_S", 60.0))
    live = c["livenessProbe"]
    assert live["timeoutSeconds"] < live["periodSeconds"] <= stall_s
    service = only(objs, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http" and service_port["port"] == port
    notes = service["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert notes["prometheus.io/port"] == str(port)
    monitored = render_variant(tmp_path, [f"overlays/{overlay}"], ["components/monitoring"])
    monitor = only(monitored, "ServiceMonitor")
    endpoints = monitor["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [(service_port["name"], "/metrics")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_routes_exist_in_the_worker(tmp_path: Path) -> None:
    """The probed and scraped paths are served, by one worker process's server and by the
    ``--processes`` launcher's (the same ProbeServer over every child's merged metrics)."""
    for metrics in (WorkerMetrics(), PoolMetrics(tmp_path)):
        with ProbeServer("127.0.0.1", 0, metrics, lambda: (True, "ok"), lambda: (True, "ok")) as s:
            for path in WORKER_ROUTES:
                url = f"http://127.0.0.1:{s.bound_port}{path}"
                with urllib.request.urlopen(url, timeout=5) as r:
                    assert r.status == 200, path
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{s.bound_port}/nope", timeout=5)
            assert err.value.code == 404
            err.value.close()


def test_no_probe_asks_per_process_ports() -> None:
    """Every probe of every workload is an httpGet on a declared container port (no exec
    script over per-process ports: the children serve none)."""
    for where, obj in workloads():
        c = container(obj)
        named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            if kind in c:
                path, port = probe_target(c[kind], named)
                assert port in named.values() and path in WORKER_ROUTES, (where, kind)


# ------------------------------------------------------------------ autoscaling


def lag_threshold(obj: Obj, interval: int) -> int:
    notes = obj["metadata"]["annotations"]
    parts = int(notes["mmstream/lag-parts-per-event"])
    assert parts == PARTS_PER_EVENT
    return parts * int(notes["mmstream/lag-events-per-second-per-pod"]) * interval


def input_partitions() -> int:
    return int(kafka_topics()[config_map()["MMSTREAM_INPUT_TOPIC"]]["spec"]["partitions"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_workers_group_on_its_input(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    deployment = only(objs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    config = dict(only(objs, "ConfigMap")["data"])
    args = parse_with_env("worker", pod_env(deployment, config), ["worker"])
    scaled = only(objs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == args.group_id
    assert meta["topic"] == args.input_topic
    assert meta["bootstrapServers"] == args.bootstrap_servers
    assert meta["offsetResetPolicy"] == args.auto_offset_reset
    assert meta["sasl"] == KEDA_SASL[args.sasl_mechanism]
    assert meta["tls"] == ("enable" if "SSL" in args.security_protocol else "disable")
    assert meta["excludePersistentLag"] == "false" and meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) == lag_threshold(scaled, spec["pollingInterval"])
    assert spec["minReplicaCount"] >= 1
    assert spec["maxReplicaCount"] * processes(deployment) == input_partitions()
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "stabilizationWindowSeconds" in behavior["scaleUp"]
    auth = only(objs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container(deployment)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert {refs["username"], refs["password"]} == secrets
    assert refs["ca"] == (
        next(v["secret"]["secretName"] for v in pod_spec(deployment)["volumes"] if "secret" in v),
        Path(args.ssl_cafile).name,
    )
    assert "HorizontalPodAutoscaler" not in {o["kind"] for o in objs}


def test_hpa_alternative_targets_the_same_lag() -> None:
    objs = build_component("hpa")
    hpa = only(objs, "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"]["name"] == "mmstream-worker"
    (metric,) = spec["metrics"]
    selector = metric["external"]["metric"]["selector"]["matchLabels"]
    config = config_map()
    assert selector == {
        "consumergroup": config["MMSTREAM_GROUP_ID"],
        "topic": config["MMSTREAM_INPUT_TOPIC"],
    }
    interval = int(hpa["metadata"]["annotations"]["mmstream/lag-interval-seconds"])
    assert int(metric["external"]["target"]["averageValue"]) == lag_threshold(hpa, interval)
    assert spec["minReplicas"] >= 1 and spec["maxReplicas"] == input_partitions()
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    adapter = yaml.safe_load((K8S / "components/hpa/prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    assert "kafka_consumergroup_lag" in rule["seriesQuery"]
    keda = yaml.safe_load((K8S / "components/keda/scaledobject.yaml").read_text())
    assert lag_threshold(keda, keda["spec"]["pollingInterval"]) == lag_threshold(hpa, interval)


def test_keda_and_hpa_are_never_combined() -> None:
    for path in K8S.rglob("kustomization.yaml"):
        components = {Path(c).name for c in yaml.safe_load(path.read_text()).get("components", [])}
        assert not {"keda", "hpa"} <= components, path


# ------------------------------------------------------------------ topics, pods, security


def test_kafka_topics() -> None:
    topics = kafka_topics()
    config = config_map()
    inp = topics[config["MMSTREAM_INPUT_TOPIC"]]["spec"]
    out = topics[config["MMSTREAM_OUTPUT_TOPIC"]]["spec"]
    dlq = topics[config["MMSTREAM_DLQ_TOPIC"]]["spec"]
    backfill = topics[f"{config['MMSTREAM_INPUT_TOPIC']}.backfill"]["spec"]

    def retention(spec: Obj) -> int:
        return int(spec["config"]["retention.ms"])

    assert retention(dlq) > retention(inp)
    assert retention(inp) >= 7 * 24 * 3600 * 1000  # a week of backfill window
    assert backfill["partitions"] == inp["partitions"]  # as replay would create it
    assert out["partitions"] >= 1
    for topic in topics.values():
        spec = topic["spec"]
        assert spec["replicas"] > int(
            spec["config"]["min.insync.replicas"]
        )  # acks=all survives one broker
        cluster = topic["metadata"]["labels"]["strimzi.io/cluster"]
        assert config["MMSTREAM_BOOTSTRAP_SERVERS"].startswith(f"{cluster}-kafka-bootstrap.")
        assert topic["metadata"]["namespace"] == "kafka"


def test_pods_are_locked_down() -> None:
    config = config_map()
    for where, obj in workloads():
        spec = pod_spec(obj)
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        c = container(obj)
        csc = c["securityContext"]
        assert csc["runAsNonRoot"] is True and csc["runAsUser"] == 10001, where
        assert csc["readOnlyRootFilesystem"] is True, where
        assert csc["allowPrivilegeEscalation"] is False, where
        assert csc["capabilities"] == {"drop": ["ALL"]}, where
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
        model = mounts[config["MMSTREAM_MODEL"]]
        assert model["readOnly"] is True, where
        assert volumes[model["name"]]["persistentVolumeClaim"]["readOnly"] is True, where
        assert Path(config["MMSTREAM_SSL_CAFILE"]).parent.as_posix() in mounts, where
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) <= set(resources["limits"]), where


def test_model_mounts_agree() -> None:
    """The replay Jobs score with the model volume the workers use (same claim)."""
    claims = set()
    for _, obj in workloads():
        claims |= {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(obj)["volumes"]
            if "persistentVolumeClaim" in v
        }
    assert claims == {only(render("base"), "PersistentVolumeClaim")["metadata"]["name"]}


def test_image_volume_component_replaces_the_claim() -> None:
    objs = build_component("model-image-volume")
    deployment = only(objs, "Deployment")
    models = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "models")
    assert set(models) == {"name", "image"}
    mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "models")
    assert "subPath" not in mount and mount["mountPath"] == config_map()["MMSTREAM_MODEL"]


def project_version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    version: str = data["project"]["version"]
    return version


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_hardware(overlay: str) -> None:
    deployment = only(render(f"overlays/{overlay}"), "Deployment")
    c = container(deployment)
    name, tag, _ = split_image(c["image"])
    # The last path component: a registry prefix (kustomize edit set image) is fine.
    assert name.rsplit("/", 1)[-1] == f"mmstream-worker-{overlay}"
    assert tag == project_version()
    env = {e["name"]: e.get("value") for e in c["env"]}
    tolerations = pod_spec(deployment).get("tolerations", [])
    if overlay == "gpu":
        assert env["MMSTREAM_DEVICE"] == "cuda"
        assert 2 <= processes(deployment) <= 4
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        } in tolerations
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU
    else:
        assert env["MMSTREAM_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in json.dumps(deployment)
    for _, obj in workloads():
        assert split_image(container(obj)["image"])[1] == project_version()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_workers(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    deployment = only(objs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert only(objs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    pdb = only(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert (
        pod_spec(deployment)["serviceAccountName"]
        == only(objs, "ServiceAccount")["metadata"]["name"]
    )
    assert {o["metadata"]["namespace"] for o in objs} == {"mmstream"}


def test_secret_is_a_template_only() -> None:
    secrets = documents("secret.example.yaml")
    for secret in secrets:
        assert all(v.startswith("REPLACE_ME") for v in secret["stringData"].values())
    for path in K8S.rglob("kustomization.yaml"):
        assert "secret.example.yaml" not in path.read_text(), path
    for overlay in OVERLAYS:
        assert "Secret" not in {o["kind"] for o in render(f"overlays/{overlay}")}
    keys = {(s["metadata"]["name"], k) for s in secrets for k in s["stringData"]}
    for where, obj in workloads():
        for e in container(obj)["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert (ref["name"], ref["key"]) in keys, where
        for v in pod_spec(obj)["volumes"]:
            if "secret" in v:
                assert v["secret"]["secretName"] in {n for n, _ in keys}, where


def test_replay_job_does_not_retry_config_errors() -> None:
    for name, kind in (("jobs/replay-job.yaml", "Job"), ("jobs/replay-cronjob.yaml", "CronJob")):
        job = only(documents(name), kind)
        spec = job["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else job["spec"]
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": "replay", "operator": "In", "values": [2]},
        } in rules
        assert pod_spec(job)["restartPolicy"] == "Never"


# ------------------------------------------------------------------ dashboard and alerts

_PROMQL_WORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    ]
)


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, matchers, ranges, label lists stripped)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


def worker_metric_names() -> dict[str, set[str]]:
    """Sample names worker/ops/metrics.py exports, by metric family."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    return {
        family.name: {family.name + s for s in suffixes[family.type]}
        for family in WorkerMetrics().registry.collect()
    }


def test_promql_metric_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="}y"}[5m]))) / b'
    expr += " + time() - c offset 5m"
    assert promql_metrics(expr) == {"a_bucket", "b", "c"}


def check_metrics(exprs: list[str], where: str) -> set[str]:
    known = set().union(*worker_metric_names().values())
    used: set[str] = set()
    for expr in exprs:
        for name in promql_metrics(expr):
            assert name in known or name in EXTERNAL_METRICS, (
                f"{where}: unknown metric {name} in {expr}"
            )
            used.add(name)
    return used


def test_grafana_dashboard_uses_real_metrics() -> None:
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    templating = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    exprs += [re.sub(r"^label_values\((\w+),.*$", r"\1", d) for d in templating]
    used = check_metrics(exprs, "grafana-dashboard.json")
    for family, samples in worker_metric_names().items():
        assert used & samples, f"the dashboard shows nothing of {family}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_use_real_metrics() -> None:
    rule = only(documents("components/monitoring/prometheusrule.yaml"), "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    check_metrics(exprs, "prometheusrule.yaml")


def test_operations_guide_covers_kubernetes() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    for heading in (
        "## Deploying on Kubernetes",
        "## Sizing",
        "## Lag autoscaling",
        "## Rolling out a new model version",
        "## Reading the metrics",
        "## Security settings",
    ):
        assert heading in text, heading
    assert "kustomize build deploy/k8s/overlays/gpu | kubectl apply -f -" in text
    for family in worker_metric_names():
        assert family in text, family
