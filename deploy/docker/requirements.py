"""The image's requirement list, read from pyproject.toml (stdlib only: runs before any install).

    python requirements.py [--extra NAME]... [--without NAME]... [PYPROJECT]

Prints, one per line, the project's base dependencies less each ``--without`` name,
then the dependencies of each ``--extra``. The Dockerfiles install that list with
``pip install -c constraints.txt -r -``, then the project itself with ``--no-deps``,
so one image never holds two ONNX Runtimes: ``[gpu]`` (onnxruntime-gpu) must be
installed *instead of* the base ``onnxruntime``, which pip extras cannot say::

    python requirements.py --extra gpu --without onnxruntime    # Dockerfile.gpu
    python requirements.py                                      # Dockerfile.cpu
    python requirements.py --extra produce                      # + the sample producer

Exit 2, with one line on stderr, when an extra or a ``--without`` name does not
exist, when the list would hold both onnxruntime and onnxruntime-gpu, or when it
would hold TensorFlow or tf2onnx (the worker image never does: ``[export]`` is
for the machine that converts models).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

DEFAULT_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: Never in a worker image (the ``[export]`` extra's converters).
FORBIDDEN = ("tensorflow", "tensorflow-cpu", "tf2onnx", "keras")
ORT_FLAVOURS = ("onnxruntime", "onnxruntime-gpu")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class RequirementsError(Exception):
    """A request the image must refuse (exit 2)."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The canonical project name of a PEP 508 requirement string."""
    match = _NAME.match(requirement)
    if match is None:
        raise RequirementsError(f"cannot read a project name from {requirement!r}")
    return canonical(match.group(1))


def image_requirements(pyproject: Path, extras: list[str], without: list[str]) -> list[str]:
    """Base dependencies less ``without``, plus the extras' dependencies, checked."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    base: list[str] = list(project.get("dependencies", []))
    optional: dict[str, list[str]] = dict(project.get("optional-dependencies", {}))
    base_names = {requirement_name(r) for r in base}
    drop = {canonical(n) for n in without}
    unknown = sorted(drop - base_names)
    if unknown:
        raise RequirementsError(
            f"--without {unknown[0]}: not a base dependency (have: {sorted(base_names)})"
        )
    out = [r for r in base if requirement_name(r) not in drop]
    for extra in extras:
        if extra not in optional:
            raise RequirementsError(f"--extra {extra}: no such extra (have: {sorted(optional)})")
        out += [r for r in optional[extra] if r not in out]
    names = {requirement_name(r) for r in out}
    if set(ORT_FLAVOURS) <= names:
        raise RequirementsError(
            "both onnxruntime and onnxruntime-gpu would be installed (they overwrite each "
            "other): with --extra gpu pass --without onnxruntime"
        )
    bad = sorted(names & set(FORBIDDEN))
    if bad:
        raise RequirementsError(f"{bad} would be installed: no TensorFlow in the worker image")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("pyproject", nargs="?", type=Path, default=DEFAULT_PYPROJECT)
    parser.add_argument("--extra", action="append", default=[], help="an extra to add")
    parser.add_argument("--without", action="append", default=[], help="a base dep to drop")
    args = parser.parse_args(argv)
    # "--extra a,b" and an empty "--extra ''" (a Docker build argument left empty) work too.
    extras = [e.strip() for arg in args.extra for e in arg.split(",") if e.strip()]
    try:
        lines = image_requirements(args.pyproject, extras, args.without)
    except (RequirementsError, OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"requirements.py: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
