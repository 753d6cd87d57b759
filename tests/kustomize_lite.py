"""Just enough kustomize to render ``deploy/k8s`` without the kustomize binary.

Supports exactly what those kustomizations use, and refuses anything else:

- ``resources``: YAML files (multi-document) and directories holding a Kustomization;
- ``components``: directories holding a Component, applied to what was accumulated;
- ``patches``: a strategic-merge patch (a mapping; ``null`` deletes a key,
  ``$patch: delete`` deletes the resource; lists of built-in kinds merge on their
  Kubernetes merge key, other lists are replaced, as in a JSON merge patch for
  custom resources) or a JSON 6902 patch (a list of add/replace/remove operations,
  with a ``target``), from ``path`` or inline ``patch``;
- ``images``: ``newName``, ``newTag``, ``digest`` on ``containers[].image`` and
  ``initContainers[].image``;
- ``namespace``: ``metadata.namespace`` of every (namespaced) resource;
- ``labels``: ``pairs`` added to ``metadata.labels`` (neither selectors nor templates).

Order within a kustomization, as kustomize's: resources, components, patches,
namespace, labels, images. New items of a merged list come before the existing ones
(kustomize's order; ``tests/test_deploy_k8s.py`` compares with ``kubectl kustomize``
where it is installed).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_KEYS = frozenset(
    {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace", "labels"}
)
COMPONENT_KEYS = KUSTOMIZATION_KEYS - {"namespace"}
#: API groups whose kinds merge lists on their merge keys (custom resources do not).
BUILTIN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling"})
#: Merge key of the lists this repository patches, by field name.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
#: ``ports``: a container's merge on containerPort, a Service's on port.
PORT_KEYS = ("containerPort", "port")
CLUSTER_SCOPED = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
)


class KustomizeError(Exception):
    """A kustomization this loader does not support, or one that is wrong."""


def build(root: Path) -> list[Obj]:
    """Render the Kustomization in directory ``root``."""
    return _build(Path(root), "Kustomization", [])


def load_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of ``path``; each must be a mapping."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return docs


def _read_kustomization(root: Path, kind: str) -> Obj:
    path = root / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise KustomizeError(f"{path}: not a mapping")
    if data.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{path}: kind {data.get('kind')!r}, expected {kind}")
    allowed = KUSTOMIZATION_KEYS if kind == "Kustomization" else COMPONENT_KEYS
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise KustomizeError(f"{path}: unsupported field(s) {unknown}")
    return data


def _build(root: Path, kind: str, accumulated: list[Obj]) -> list[Obj]:
    k = _read_kustomization(root, kind)
    objs = accumulated
    for entry in k.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            objs = objs + _build(path, "Kustomization", [])
        elif path.is_file():
            objs = objs + load_documents(path)
        else:
            raise KustomizeError(f"{root}: resource {entry} not found")
    for entry in k.get("components", []):
        objs = _build((root / entry).resolve(), "Component", objs)
    objs = copy.deepcopy(objs)
    for patch in k.get("patches", []):
        objs = _apply_patch(root, patch, objs)
    if "namespace" in k:
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        unknown = sorted(set(label) - {"pairs"})
        if unknown:
            raise KustomizeError(f"{root}: labels: unsupported field(s) {unknown}")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in k.get("images", []):
        for obj in objs:
            _set_images(obj, image)
    _check_unique(objs, root)
    return objs


def _check_unique(objs: list[Obj], root: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objs:
        meta = obj["metadata"]
        key = (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])
        if key in seen:
            raise KustomizeError(f"{root}: {key} defined twice")
        seen.add(key)


# ------------------------------------------------------------------ patches


def _apply_patch(root: Path, spec: Obj, objs: list[Obj]) -> list[Obj]:
    unknown = sorted(set(spec) - {"path", "patch", "target"})
    if unknown or ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{root}: a patch needs one of path/patch (got {sorted(spec)})")
    text = (root / spec["path"]).read_text(encoding="utf-8") if "path" in spec else spec["patch"]
    body = yaml.safe_load(text)
    target: Obj | None = spec.get("target")
    if isinstance(body, list):
        if target is None:
            raise KustomizeError(f"{root}: a JSON 6902 patch needs a target")
        hits = [o for o in objs if _matches(o, target)]
        if not hits:
            raise KustomizeError(f"{root}: no resource matches {target}")
        for obj in hits:
            json6902(obj, body)
        return objs
    if not isinstance(body, dict):
        raise KustomizeError(f"{root}: a patch is a mapping or a list")
    if target is None:
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
    hits = [o for o in objs if _matches(o, target)]
    if not hits:
        raise KustomizeError(f"{root}: no resource matches {target}")
    if body.get("$patch") == "delete":
        return [o for o in objs if not any(o is h for h in hits)]
    for obj in hits:
        group = obj["apiVersion"].rpartition("/")[0]
        patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
        patch["metadata"] = {k: v for k, v in patch["metadata"].items() if k != "name"}
        strategic_merge(obj, patch, keyed=group in BUILTIN_GROUPS)
    return objs


def _matches(obj: Obj, target: Obj) -> bool:
    unknown = sorted(set(target) - {"group", "version", "kind", "name"})
    if unknown:
        raise KustomizeError(f"patch target: unsupported field(s) {unknown}")
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def strategic_merge(base: Obj, patch: Obj, *, keyed: bool) -> None:
    """Merge ``patch`` into ``base`` in place (``None`` deletes the key)."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"unsupported directive {key}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}
            strategic_merge(base[key], value, keyed=keyed)
        elif isinstance(value, list) and isinstance(base.get(key), list) and keyed:
            base[key] = _merge_list(key, base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _merge_list(field: str, base: list[Any], patch: list[Any]) -> list[Any]:
    merge_key = MERGE_KEYS.get(field)
    if field == "ports":
        merge_key = next((k for k in PORT_KEYS if patch and k in patch[0]), None)
    if merge_key is None or not all(isinstance(i, dict) for i in base + patch):
        return copy.deepcopy(patch)  # no merge key: the patch's list replaces
    out = copy.deepcopy(base)
    new: list[Any] = []
    for item in patch:
        match = next((o for o in out if o.get(merge_key) == item.get(merge_key)), None)
        if match is None:
            new.append(copy.deepcopy(item))
        else:
            strategic_merge(match, item, keyed=True)
    return new + out


def json6902(obj: Obj, ops: list[Obj]) -> None:
    """Apply JSON 6902 ``add``/``replace``/``remove`` operations to ``obj`` in place."""
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            raise KustomizeError("JSON 6902: the whole document cannot be patched")
        parent: Any = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(last)]
            else:
                raise KustomizeError(f"JSON 6902: unsupported op {kind}")
        elif kind in ("add", "replace"):
            if kind == "replace" and last not in parent:
                raise KustomizeError(f"JSON 6902: replace of a missing {op['path']}")
            parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[last]
        else:
            raise KustomizeError(f"JSON 6902: unsupported op {kind}")


# ------------------------------------------------------------------ images


def split_image(ref: str) -> tuple[str, str, str]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_images(node: Any, image: Obj) -> None:
    unknown = sorted(set(image) - {"name", "newName", "newTag", "digest"})
    if unknown:
        raise KustomizeError(f"images: unsupported field(s) {unknown}")
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{new}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{new}:{image['newTag']}"
                else:
                    container["image"] = (
                        new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                    )
        else:
            _set_images(value, image)
