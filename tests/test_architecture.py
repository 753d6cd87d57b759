"""The package boundaries, checked from the source (AST), so they cannot erode quietly."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_LIBRARIES = ("kafka", "confluent_kafka", "aiokafka")
#: Modules that still build kafka-python clients themselves (none left: archive, bench
#: and produce went behind the edge with the second client). The list may only shrink.
NOT_YET_BEHIND_THE_EDGE: frozenset[str] = frozenset()


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def uses(names: set[str], roots: tuple[str, ...]) -> set[str]:
    return {n for n in names if n.split(".")[0] in roots}


def test_only_the_edge_imports_a_kafka_client_library() -> None:
    offenders = {}
    for path in modules("worker"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("worker/edge/") or rel in NOT_YET_BEHIND_THE_EDGE:
            continue
        found = uses(imports(path), CLIENT_LIBRARIES)
        if found:
            offenders[rel] = sorted(found)
    assert offenders == {}


def test_the_core_is_given_its_clients() -> None:
    for path in modules("worker/core"):
        found = {n for n in imports(path) if n.startswith("worker.edge.")}
        assert found <= {"worker.edge.client"}, (path.name, found)


def test_export_depends_only_on_the_contract() -> None:
    for path in modules("export"):
        ours = {n for n in imports(path) if n.split(".")[0] == "worker"}
        assert all(n.startswith("worker.contract") for n in ours), (path.name, ours)


def test_the_contract_imports_no_other_package_of_the_worker() -> None:
    for path in modules("worker/contract"):
        ours = {n for n in imports(path) if n.split(".")[0] == "worker"}
        assert all(n.startswith("worker.contract") for n in ours), (path.name, ours)
        assert not uses(imports(path), (*CLIENT_LIBRARIES, "onnxruntime", "tensorflow"))


def test_the_worker_never_imports_tensorflow() -> None:
    for path in modules("worker"):
        assert not uses(imports(path), ("tensorflow", "keras", "tf2onnx")), path


def test_the_list_of_modules_not_yet_behind_the_edge_only_shrinks() -> None:
    for rel in NOT_YET_BEHIND_THE_EDGE:
        assert uses(imports(ROOT / rel), CLIENT_LIBRARIES), f"{rel} is behind the edge now"
