"""Schema validation of the deployable files under cluster/ and serve/, against the schemas of the
software that reads them: Ray Serve's `ServeDeploySchema`, `promtool check config`, the Kubernetes
core API (bundled by kubernetes-validate) for core objects and for every pod template and Service
embedded in the Ray custom resources, and the KubeRay / Prometheus Operator CRDs when a directory
of them is given. test_cluster_definitions.py checks what the manifests mean; this file checks
that a cluster would accept them at all (a typo'd field is silently dropped or rejected there)."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.cluster.k8s_schemas import (
    crd_validator,
    schema_errors,
    selector_matches,
    structural_to_json_schema,
)
from tests.cluster.test_cluster_definitions import (
    CLUSTER,
    KUBERAY,
    ROOT,
    cluster_spec,
    load_docs,
    pod_templates,
    ray_resources,
)

# The oldest minor upstream still supports (the newest three as of Dec 2026: 1.35-1.37), so a field
# that only newer clusters know fails here. Strict schemas: an unknown field is an error, as with
# `kubectl apply --validate=strict`.
K8S_VERSION = "1.35"

PODMONITOR = CLUSTER / "prometheus" / "podmonitor.yaml"
PROMETHEUS_CONFIG = CLUSTER / "prometheus" / "prometheus.yml"
SERVE_CONFIG = ROOT / "serve" / "serve_config.yaml"

# API group → (variable naming the CRD directory, where its CRDs come from); file names per kind as
# in those projects' generated CRD directories.
CRD_SOURCES = {
    "ray.io": (
        "KUBERAY_CRDS",
        "KubeRay's ray-operator/config/crd/bases at the release you deploy, v1.5.1 or later",
    ),
    "monitoring.coreos.com": (
        "PROMETHEUS_OPERATOR_CRDS",
        "prometheus-operator's example/prometheus-operator-crd",
    ),
}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
}

# Labels KubeRay puts on every Ray pod (ray-operator/controllers/ray/common/pod.go, labelPod): the
# template's labels override these defaults, except the three marked protected.
KUBERAY_POD_LABELS = {
    "ray.io/is-ray-node": "yes",
    "app.kubernetes.io/name": "kuberay",
    "app.kubernetes.io/created-by": "kuberay-operator",
}
KUBERAY_PROTECTED_LABELS = ("ray.io/cluster", "ray.io/node-type", "ray.io/group")
KUBERAY_HEAD_GROUP = "headgroup"


def documents() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object of the repository, as (file name, document)."""
    paths = sorted(KUBERAY.glob("*.yaml")) + [PODMONITOR]
    return [(path.name, doc) for path in paths for doc in load_docs(path)]


def is_custom(doc: dict[str, Any]) -> bool:
    return doc["kind"] in CRD_FILES


def doc_id(value: Any) -> str:
    return value if isinstance(value, str) else f"{value['kind']}-{value['metadata']['name']}"


CORE = [(name, doc) for name, doc in documents() if not is_custom(doc)]
CUSTOM = [(name, doc) for name, doc in documents() if is_custom(doc)]


# --- Ray Serve ----------------------------------------------------------------------------------


def rayservice() -> dict[str, Any]:
    (service,) = [doc for _, doc in ray_resources() if doc["kind"] == "RayService"]
    return service


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("serve_config.yaml", yaml.safe_load(SERVE_CONFIG.read_text())),
        ("serveConfigV2", yaml.safe_load(rayservice()["spec"]["serveConfigV2"])),
    ]


def ignored_keys(given: Any, kept: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """Keys of `given` that are missing from the validated model's dump `kept`."""
    if isinstance(given, dict) and isinstance(kept, dict):
        missing = [".".join(map(str, path + (key,))) for key in given if key not in kept]
        return missing + [
            name
            for key in given
            if key in kept
            for name in ignored_keys(given[key], kept[key], path + (key,))
        ]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [
            name
            for i, (a, b) in enumerate(zip(given, kept, strict=True))
            for name in ignored_keys(a, b, path + (i,))
        ]
    return []


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """Errors of `ServeDeploySchema`, and the keys it accepts but drops: Serve ignores unknown fields
    on purpose (forward compatibility), so a misspelt option would silently have no effect."""
    import pydantic
    from ray.serve.schema import ServeDeploySchema  # pydantic v2 model in Ray >= 2.52

    try:
        model = ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    kept = model.model_dump(exclude_unset=True, by_alias=True)
    return [f"{key}: ignored by Serve" for key in ignored_keys(config, kept)]


@pytest.mark.parametrize("name,config", serve_configs(), ids=[name for name, _ in serve_configs()])
def test_serve_config_passes_serve_deploy_schema(name, config):
    assert serve_config_problems(config) == [], name


def _bad_port(config: dict[str, Any]) -> None:
    config["http_options"]["port"] = "eighty"


def _misspelt_deployment_option(config: dict[str, Any]) -> None:
    config["applications"][0]["deployments"][0]["ray_actor_option"] = {"num_gpus": 1}


def _misspelt_proxy_location(config: dict[str, Any]) -> None:
    config["proxy_locaton"] = config.pop("proxy_location")


@pytest.mark.parametrize(
    "break_it,expected",
    [
        (_bad_port, "http_options.port"),
        (_misspelt_deployment_option, "applications.0.deployments.0.ray_actor_option"),
        (_misspelt_proxy_location, "proxy_locaton"),
    ],
    ids=["wrong-type", "misspelt-deployment-option", "misspelt-top-level-key"],
)
def test_serve_validation_rejects_broken_configs(break_it, expected):
    config = copy.deepcopy(serve_configs()[1][1])
    break_it(config)
    problems = serve_config_problems(config)
    assert any(p.startswith(expected + ":") for p in problems), problems


# --- Prometheus ---------------------------------------------------------------------------------


def promtool_check(path: Path) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus`, which `make setup` installs)")
    return subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_prometheus_config_passes_promtool():
    result = promtool_check(PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    text = PROMETHEUS_CONFIG.read_text()
    assert "refresh_interval:" in text
    broken = tmp_path / "prometheus.yml"
    broken.write_text(text.replace("refresh_interval:", "refresh_intervall:"))
    result = promtool_check(broken)
    assert result.returncode != 0
    assert "refresh_intervall" in result.stdout + result.stderr


# --- Kubernetes core schemas ----------------------------------------------------------------------


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Strict validation of a core object against the bundled Kubernetes OpenAPI schema."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A PodTemplateSpec wrapped in a core PodTemplate (kubernetes-validate validates objects)."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def embedded_core_objects(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The core objects inside a Ray custom resource: its pod templates and the RayService's Service."""
    found = [(group, as_pod_template(template)) for group, template in pod_templates(cluster_spec(doc))]
    if "serveService" in doc["spec"]:
        service = {"apiVersion": "v1", "kind": "Service", **doc["spec"]["serveService"]}
        service.setdefault("metadata", {"name": "serve-svc"})  # KubeRay names it when unnamed
        found.append(("serveService", service))
    return found


@pytest.mark.parametrize("name,doc", CORE, ids=doc_id)
def test_core_objects_pass_kubernetes_schema(name, doc):
    assert core_errors(doc) == [], name


@pytest.mark.parametrize("name,doc", ray_resources(), ids=doc_id)
def test_embedded_pod_templates_and_services_pass_kubernetes_schema(name, doc):
    found = embedded_core_objects(doc)
    assert len(found) >= 2, f"{name}: no pod template found"
    errors = {part: core_errors(obj) for part, obj in found}
    assert not any(errors.values()), f"{name}: {errors}"


@pytest.mark.parametrize("name,doc", documents(), ids=doc_id)
def test_metadata_passes_object_meta_schema(name, doc):
    """CRDs declare metadata as a bare object; the API server still validates it as ObjectMeta."""
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    assert core_errors(probe) == [], name


def test_kubernetes_schema_rejects_a_misspelt_container_field():
    template = copy.deepcopy(pod_templates(cluster_spec(ray_resources()[0][1]))[0][1])
    template["spec"]["containers"][0]["imag"] = template["spec"]["containers"][0].pop("image")
    (error,) = core_errors(as_pod_template(template))
    assert "template.spec.containers.0" in error and "'imag'" in error


def test_kubernetes_schema_rejects_a_wrongly_typed_service_port():
    service = copy.deepcopy(dict(embedded_core_objects(rayservice()))["serveService"])
    service["spec"]["ports"][0]["port"] = "8000"
    (error,) = core_errors(service)
    assert error.startswith("spec.ports.0.port:")


# --- KubeRay and Prometheus Operator CRDs -----------------------------------------------------------


@functools.cache
def load_crd(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    (crd,) = [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]
    return crd


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Violations of the CRD's schema for the object's apiVersion; skips without the CRD directory."""
    group = doc["apiVersion"].split("/")[0]
    variable, source = CRD_SOURCES[group]
    directory = os.environ.get(variable)
    if not directory:
        pytest.skip(f"set {variable} to a directory holding {CRD_FILES[doc['kind']]} ({source})")
    path = Path(directory) / CRD_FILES[doc["kind"]]
    assert path.is_file(), f"{variable}={directory} has no {path.name}"
    return schema_errors(crd_validator(load_crd(path), doc["apiVersion"], doc["kind"]), doc)


@pytest.mark.parametrize("name,doc", CUSTOM, ids=doc_id)
def test_custom_resources_pass_their_crds(name, doc):
    assert crd_errors(doc) == [], name


def test_crd_validation_rejects_a_misspelt_ray_cluster_field():
    (cluster,) = [doc for _, doc in ray_resources() if doc["kind"] == "RayCluster"]
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpec"] = broken["spec"].pop("workerGroupSpecs")
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imag"] = "dimoe-vl:latest"
    errors = crd_errors(broken)
    assert any(e.startswith("spec:") and "'workerGroupSpec'" in e for e in errors), errors
    assert any(e.startswith("spec.headGroupSpec.template.spec.containers.0:") for e in errors), errors


def test_crd_validation_rejects_a_misspelt_podmonitor_field():
    broken = copy.deepcopy(load_docs(PODMONITOR)[0])
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "10s"
    errors = crd_errors(broken)
    assert any(e.startswith("spec.podMetricsEndpoints.0:") and "'intervall'" in e for e in errors), errors


def test_crd_schema_translation_follows_kubernetes_rules():
    """The translation on a small structural schema, so its rules are pinned without any CRD."""
    schema = structural_to_json_schema(
        {
            "type": "object",
            "properties": {
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "properties": {
                        "port": {
                            "anyOf": [{"type": "integer"}, {"type": "string"}],
                            "x-kubernetes-int-or-string": True,
                        },
                        "quantity": {"x-kubernetes-int-or-string": True},
                        "params": {"type": "object", "additionalProperties": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        "empty": {"type": "object"},
                        "maybe": {"type": "string", "nullable": True},
                    },
                },
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)

    def ok(spec: dict[str, Any]) -> bool:
        return not schema_errors(validator, {"metadata": {"name": "x", "labels": {}}, "spec": spec})

    assert ok({"port": 8080}) and ok({"port": "metrics"}) and ok({"quantity": 8}) and ok({"quantity": "8"})
    assert not ok({"port": 1.5}) and not ok({"quantity": True})
    assert ok({"params": {"num-gpus": "8"}}) and not ok({"params": {"num-gpus": 8}})
    assert ok({"free": {"anything": {"nested": 1}}})
    assert ok({"empty": {}}) and not ok({"empty": {"pruned": 1}})
    assert ok({"maybe": None}) and ok({"maybe": "x"}) and not ok({"maybe": 1})
    assert not ok({"unknown": 1})
    assert schema_errors(validator, {"kind": "X"}) == [
        "<root>: Additional properties are not allowed ('kind' was unexpected)"
    ]


# --- Cross-checks: PodMonitor ↔ Ray pods, Serve ports ↔ Service ------------------------------------


def ray_pods() -> list[tuple[str, dict[str, str], dict[str, Any], dict[str, str]]]:
    """(where, labels the running pod carries, its Ray container, its rayStartParams) per pod template."""
    pods = []
    for name, doc in ray_resources():
        spec = cluster_spec(doc)
        groups = [("head", KUBERAY_HEAD_GROUP, spec["headGroupSpec"])]
        groups += [("worker", group["groupName"], group) for group in spec["workerGroupSpecs"]]
        for node_type, group_name, group in groups:
            template = group["template"]
            labels = dict(KUBERAY_POD_LABELS)
            labels.update(
                (k, v)
                for k, v in template["metadata"].get("labels", {}).items()
                if k not in KUBERAY_PROTECTED_LABELS
            )
            labels.update(
                {
                    "ray.io/cluster": doc["metadata"]["name"],
                    "ray.io/node-type": node_type,
                    "ray.io/group": group_name,
                }
            )
            ray_container = template["spec"]["containers"][0]  # KubeRay's Ray container is the first one
            pods.append((f"{name}/{group_name}", labels, ray_container, group["rayStartParams"]))
    return pods


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1", "b": "3"}}, {"a": "1", "b": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
            {"a": "1"},
            False,
        ),
    ],
)
def test_label_selector_semantics(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


def test_podmonitor_selects_every_ray_pod_and_nothing_else():
    (monitor,) = load_docs(PODMONITOR)
    selector = monitor["spec"]["selector"]
    pods = ray_pods()
    assert len(pods) == 2 * len(ray_resources())
    for where, labels, _, _ in pods:
        assert selector_matches(selector, labels), f"the PodMonitor does not select {where} ({labels})"
    # a pod with the app label but no Ray node type (a RayJob submitter, say) is not scraped
    assert not selector_matches(selector, {"app.kubernetes.io/name": "dimoe-vl"})


def test_podmonitor_port_is_the_metrics_port_of_every_ray_container():
    (monitor,) = load_docs(PODMONITOR)
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        for where, _, container, params in ray_pods():
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            assert endpoint["port"] in ports, f"{where}: no container port named {endpoint['port']}"
            assert str(ports[endpoint["port"]]) == params["metrics-export-port"], where


def test_serve_ports_match_the_head_container_and_the_serve_service():
    service = rayservice()
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    wanted = {"serve": config["http_options"]["port"], "serve-grpc": config["grpc_options"]["port"]}
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container_ports = {p.get("name"): p["containerPort"] for p in head["ports"]}
    assert {name: container_ports.get(name) for name in wanted} == wanted

    service_ports = {p["name"]: p for p in service["spec"]["serveService"]["spec"]["ports"]}
    assert set(wanted) <= set(service_ports)
    for name, number in wanted.items():
        port = service_ports[name]
        assert port["port"] == number, name
        target = port.get("targetPort", port["port"])  # a number, or a container port's name
        assert container_ports.get(target, target) == number, f"{name}: targetPort {target}"
