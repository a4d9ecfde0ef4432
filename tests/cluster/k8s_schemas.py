"""Kubernetes semantics that the manifest tests need and no installed package provides: a CRD's
structural `openAPIV3Schema` as a JSON Schema that the API server would enforce with strict field
validation, and label-selector matching. Written from the Kubernetes API conventions, not from a
cluster: the tests in test_manifests.py pin each rule with a small case of their own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema

# Keywords of a structural schema that carry no validation a JSON Schema validator can perform here
# (`x-kubernetes-validations` are CEL rules: the API server runs them, jsonschema cannot).
_DROPPED = {"description", "default", "example", "externalDocs", "nullable"}


def structural_to_json_schema(node: Mapping[str, Any], *, root: bool = True) -> dict[str, Any]:
    """A CRD schema node → a JSON Schema (draft 4, the dialect OpenAPI v3.0 builds on).

    Kubernetes rules it encodes: an object is closed (the API server prunes unknown fields, and
    `kubectl apply --validate=strict` reports them) unless it is a map (`additionalProperties`)
    or has `x-kubernetes-preserve-unknown-fields`; `x-kubernetes-int-or-string` takes an integer
    or a string; `nullable` also takes null; an embedded resource has apiVersion/kind/metadata.
    The root's `metadata` is ObjectMeta, which the CRD only declares as `type: object`, so it
    stays open here (test it against ObjectMeta separately).
    """
    out: dict[str, Any] = {
        key: value
        for key, value in node.items()
        if key not in _DROPPED and not key.startswith("x-kubernetes-")
    }
    if "properties" in node:
        out["properties"] = {
            name: (dict(sub) if root and name == "metadata" else structural_to_json_schema(sub, root=False))
            for name, sub in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = structural_to_json_schema(node["additionalProperties"], root=False)
    if isinstance(node.get("items"), Mapping):
        out["items"] = structural_to_json_schema(node["items"], root=False)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [structural_to_json_schema(sub, root=False) for sub in node[key]]
    if "not" in node:
        out["not"] = structural_to_json_schema(node["not"], root=False)

    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def crd_validator(crd: Mapping[str, Any], api_version: str, kind: str) -> jsonschema.Draft4Validator:
    """The validator of `kind` at `api_version` (group/version) from a CRD document: the version
    must be one the CRD serves, as the API server refuses the others."""
    group, _, version = api_version.rpartition("/")
    spec = crd["spec"]
    assert (spec["group"], spec["names"]["kind"]) == (group, kind), (
        f"the CRD defines {spec['group']}/{spec['names']['kind']}, not {group}/{kind}"
    )
    served = {v["name"]: v for v in spec["versions"] if v.get("served")}
    assert version in served, f"the CRD serves {sorted(served)} of {kind}, not {version}"
    schema = structural_to_json_schema(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def schema_errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    """Every violation as `path: message`, sorted, so that a failure lists all of them at once."""
    found = []
    for error in validator.iter_errors(instance):
        path = ".".join(str(part) for part in error.absolute_path) or "<root>"
        found.append(f"{path}: {error.message}")
    return sorted(found)


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a metav1.LabelSelector selects an object with `labels` (all terms are ANDed; an
    empty selector selects everything)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    return all(_expression_matches(expr, labels) for expr in selector.get("matchExpressions", []))


def _expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator = expr["key"], expr["operator"]
    values: Iterable[str] = expr.get("values", [])
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")
