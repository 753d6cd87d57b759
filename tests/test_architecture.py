"""The package boundaries, checked from the source (AST), so they cannot erode quietly.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_LIBRARIES = ("kafka", "confluent_kafka", "aiokafka")
#: Modules that still build kafka-python clients themselves (none left: archive, bench
#: and produce went behind the edge with the second client). The list may only shrink.
NOT_YET_BEHIND_THE_EDGE: frozenset[str] = frozenset()
#: The bench's baselines measure the client libraries themselves, so they use them directly.
BASELINES = frozenset({"worker/tools/bench/baseline.py"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports; ``from a import b`` is ``a.b`` when that is a module."""
    out: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found = {f"{base}.{a.name}" for a in node.names}
            submodules = {n for n in found if _is_module(n)}
            out.update(submodules)
            if submodules != found:  # names from the module itself (not just its submodules)
                out.add(base)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__init__.py").is_file()


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def uses(names: set[str], roots: tuple[str, ...]) -> set[str]:
    return {n for n in names if n.split(".")[0] in roots}


def test_only_the_edge_imports_a_kafka_client_library() -> None:
    offenders = {}
    for path in modules("worker"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("worker/edge/") or rel in NOT_YET_BEHIND_THE_EDGE | BASELINES:
            continue
        found = uses(imports(path), CLIENT_LIBRARIES)
        if found:
            offenders[rel] = sorted(found)
    assert offenders == {}


def test_the_core_is_given_its_clients() -> None:
    for path in modules("worker/core"):
        found = {n for n in imports(path) if n.startswith("worker.edge.")}
        assert found <= {"worker.edge.client"}, (path.name, found)


def test_the_core_imports_nothing_from_the_layers_above_it() -> None:
    above = ("worker.ops", "worker.backfill", "worker.tools", "worker.cli")
    offenders = {
        path.name: sorted(n for n in imports(path) if n.startswith(above))
        for path in modules("worker/core")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_edge_interface_imports_no_implementation() -> None:
    ours = {n for n in imports(ROOT / "worker/edge/client.py") if n.startswith("worker.")}
    assert all(n.startswith(("worker.contract", "worker.config")) for n in ours), ours
    assert not uses(imports(ROOT / "worker/edge/common.py"), CLIENT_LIBRARIES)


def test_each_client_imports_the_other_nowhere() -> None:
    for mine, other in (("kafka_python", "confluent"), ("confluent", "kafka_python")):
        for path in modules(f"worker/edge/{mine}"):
            found = imports(path)
            assert not any(n.startswith(f"worker.edge.{other}") for n in found), path
            library = "confluent_kafka" if other == "confluent" else "kafka"
            assert not uses(found, (library,)), path


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_cycle_in_the_worker() -> None:
    names = {module_name(p) for p in modules("worker")}
    graph = {module_name(p): imports(p) & names for p in modules("worker")}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


ISOLATED = [
    ("kafka", "worker.edge.confluent", "tests/test_confluent_edge.py"),
    ("confluent_kafka", "worker.edge.kafka_python", "tests/test_kafka_python_edge.py"),
]


@pytest.mark.parametrize(
    ("missing", "client", "tests"), ISOLATED, ids=["confluent", "kafka-python"]
)
def test_each_client_loads_and_passes_its_tests_without_the_others_library(
    missing: str, client: str, tests: str
) -> None:
    # A library set to None in sys.modules cannot be imported, as if it were not installed.
    code = (
        f"import sys; sys.modules[{missing!r}] = None; import {client}; import pytest; "
        f"sys.exit(pytest.main(['-q', '--noconftest', '-p', 'no:cacheprovider', {tests!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


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


def test_the_client_choice_names_both_clients() -> None:
    from worker.contract.errors import ConfigError
    from worker.edge.choice import clients_for
    from worker.edge.confluent import ConfluentClients
    from worker.edge.kafka_python import KafkaPythonClients

    assert isinstance(clients_for("kafka-python"), KafkaPythonClients)
    assert isinstance(clients_for("confluent"), ConfluentClients)
    with pytest.raises(ConfigError, match="--kafka-client"):
        clients_for("pykafka")


def test_the_list_of_modules_not_yet_behind_the_edge_only_shrinks() -> None:
    for rel in NOT_YET_BEHIND_THE_EDGE:
        assert uses(imports(ROOT / rel), CLIENT_LIBRARIES), f"{rel} is behind the edge now"
