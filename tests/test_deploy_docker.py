"""deploy/docker: the Dockerfiles, compose.yaml and .dockerignore, read as text (no Docker here).

What a build or a `docker compose up` would find out late is checked here instead: the pip
lines name extras that exist and use the constraints; the GPU image gets onnxruntime-gpu
and never the CPU onnxruntime nor TensorFlow; the entry point is the real console script;
every MMSTREAM_* variable and every flag is one the CLI knows, and the settings the
containers get make a valid configuration; ports, user, signal and model path agree.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from worker.cli.main import build_parser
from worker.config import WorkerConfig, check_unknown_env
from worker.tools.produce import ProduceConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yaml"
REQUIREMENTS_PY = DOCKER / "requirements.py"
UID = "10001"
TENSORFLOW = {"tensorflow", "tensorflow-cpu", "tf2onnx", "keras"}


# ------------------------------------------------------------------ reading the files


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest, continuation lines joined
    stage: int  # index of the FROM it follows


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with ``\\`` continuations joined and comment lines dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path.name}: a continuation runs past the end of the file"
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def args_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """``ARG NAME=default`` values (the last one wins, as in a multi-stage file)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip().strip("\"'")
    return out


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV`` of the given instructions, ``K=V`` form (several per line)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                assert "=" in item, f"ENV {ins.args!r}: use the KEY=VALUE form"
                key, _, value = item.partition("=")
                out[key] = value
    return out


def run_commands(instructions: list[Instruction]) -> list[str]:
    """Every shell command of every RUN, split at ``&&``."""
    return [
        part.strip()
        for ins in instructions
        if ins.keyword == "RUN"
        for part in ins.args.split("&&")
        if part.strip()
    ]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The arguments after ``pip install`` of each pip install command."""
    out = []
    for cmd in run_commands(instructions):
        if re.search(r"\bpip install\b", cmd):
            out.append(shlex.split(cmd.split("pip install", 1)[1]))
    return out


def exec_form(ins: Instruction) -> list[str]:
    value = yaml.safe_load(ins.args)  # a JSON array is YAML too
    assert isinstance(value, list), f"{ins.keyword} {ins.args}: use the exec (JSON) form"
    return [str(v) for v in value]


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def extras() -> dict[str, list[str]]:
    return dict(pyproject()["project"]["optional-dependencies"])


def pins(*files: Path) -> dict[str, str]:
    """``name==version`` lines of constraint files, by canonical name."""
    out: dict[str, str] = {}
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                assert version, f"{path.name}: {line!r} is not pinned with =="
                out[canonicalize_name(name)] = version
    return out


def requirements_call(instructions: list[Instruction]) -> list[str]:
    """The arguments the Dockerfile passes to requirements.py, build args at their defaults."""
    defaults = args_defaults(instructions)
    calls = [c for c in run_commands(instructions) if "requirements.py" in c]
    assert len(calls) == 1, calls
    tail = calls[0].split("requirements.py", 1)[1].split(">", 1)[0]
    words = shlex.split(tail.replace("}", " ").replace("{", " "))
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], w) for w in words]


def run_requirements(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REQUIREMENTS_PY), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def image_requirement_names(flavour: str) -> set[str]:
    """Canonical names of what requirements.py lists for the image (defaults of the ARGs)."""
    instructions = parse_dockerfile(DOCKERFILES[flavour])
    r = run_requirements(*requirements_call(instructions))
    assert r.returncode == 0, r.stderr
    return {canonicalize_name(Requirement(line).name) for line in r.stdout.splitlines()}


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def interpolate(value: object) -> str:
    """Compose's ``${NAME:-default}`` at its default and ``$$`` as ``$`` (no variables set)."""
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", str(value))
    return text.replace("$$", "$")


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(v) for k, v in env.items()}


def service_command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", ["worker"])
    assert isinstance(command, list), "use a list: no shell word splitting surprises"
    return [interpolate(c) for c in command]


def mmstream_services() -> dict[str, dict[str, Any]]:
    """Services that run the project's image (they have a build of Dockerfile.cpu/gpu)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if "deploy/docker/Dockerfile" in str(svc.get("build", {}).get("dockerfile", ""))
    }


# ------------------------------------------------------------------ the CLI's view


@cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser({})
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def flags_of(command: str) -> set[str]:
    return {
        flag
        for action in subcommands()[command]._actions
        for flag in action.option_strings
        if flag.startswith("--")
    }


def env_names_of(command: str) -> set[str]:
    """The ``[env: NAME]`` names in a subcommand's help (one per flag)."""
    names: set[str] = set()
    for action in subcommands()[command]._actions:
        names.update(re.findall(r"\[env: (MMSTREAM_\w+)\]", action.help or ""))
    return names


def known_env() -> set[str]:
    known = build_parser({}).get_default("known_env")
    assert isinstance(known, set)
    return known


def settings_from(command: list[str], environ: dict[str, str]) -> dict[str, object]:
    """What ``mmstream <command>`` would configure from flags and env (as ``main`` does)."""
    parser = build_parser(environ)
    args = parser.parse_args(command)
    check_unknown_env(args.known_env, environ)
    skip = ("command", "handler", "known_env")
    return {k: v for k, v in vars(args).items() if k not in skip}


def container_settings(service: dict[str, Any]) -> dict[str, object]:
    """A compose service's settings as its container sees them: the image's ENV, then the
    service's environment, then its command's flags."""
    image_env = env_of(final_stage(parse_dockerfile(DOCKERFILES["cpu"])))
    env = {**image_env, **service_env(service)}
    environ = {k: v for k, v in env.items() if k.startswith("MMSTREAM_")}
    return settings_from(service_command(service), environ)


# ------------------------------------------------------------------ .dockerignore


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            out.append((negate, line.lstrip("!").strip("/")))
    return out


def ignored(rel: str) -> bool:
    """Docker's rule, near enough: the last pattern matching the path or a parent decides."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, pattern in dockerignore_patterns():
        at_root = pattern.replace("**/", "")  # '**/x' also matches 'x' at the root
        if any(fnmatchcase(p, pattern) or fnmatchcase(p, at_root) for p in prefixes):
            result = not negate
    return result


# ================================================================== tests: Dockerfiles


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_pip_lines_use_the_constraints_and_name_extras_that_exist(flavour: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[flavour])
    installs = pip_installs(instructions)
    assert installs, "no pip install"
    for args in installs:
        if "--no-deps" in args:
            # Only the project itself goes in without its dependencies.
            assert [a for a in args if not a.startswith("-")] == ["."], args
            continue
        constraints = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
        assert "constraints.txt" in constraints, args
        for c in constraints:
            assert (ROOT / c).is_file(), c  # WORKDIR /src mirrors the repository root
        for word in args:  # `.[x,y]` forms, if any
            for group in re.findall(r"^\.\[([^\]]*)\]$", word):
                assert set(group.split(",")) <= set(extras()), word
    call = requirements_call(instructions)
    named = [call[i + 1] for i, a in enumerate(call) if a == "--extra"]
    for value in named:
        for extra in filter(None, value.split(",")):
            assert extra in extras(), f"--extra {extra}: not in pyproject's extras"
    for extra in filter(None, args_defaults(instructions).get("EXTRAS", "").split(",")):
        assert extra in extras()


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_direct_requirement_is_pinned(flavour: str) -> None:
    files = [ROOT / "constraints.txt"]
    if flavour == "gpu":
        files.append(DOCKER / "constraints-gpu.txt")
    pinned = pins(*files)
    for name in image_requirement_names(flavour):
        assert name in pinned, f"{name} is not pinned in {[f.name for f in files]}"
    if flavour == "gpu":
        # onnxruntime-gpu[cuda,cudnn]: the CUDA and cuDNN wheels, pinned too.
        assert "onnxruntime-gpu[cuda,cudnn]" in " ".join(
            run_commands(parse_dockerfile(DOCKERFILES["gpu"]))
        )
        gpu_pins = pins(DOCKER / "constraints-gpu.txt")
        for wheel in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13"):
            assert gpu_pins.get(wheel, "").split(".")[0] in {"13", "9"}, wheel


def test_gpu_image_gets_onnxruntime_gpu_never_the_cpu_one_nor_tensorflow() -> None:
    names = image_requirement_names("gpu")
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert not names & TENSORFLOW
    # [gpu] really is onnxruntime-gpu, and the pin satisfies pyproject's range.
    (gpu_req,) = [Requirement(r) for r in extras()["gpu"]]
    assert canonicalize_name(gpu_req.name) == "onnxruntime-gpu"
    version = pins(DOCKER / "constraints-gpu.txt")["onnxruntime-gpu"]
    assert gpu_req.specifier.contains(version), version
    assert version.startswith("1.31."), "the CUDA 13 / cuDNN 9 build the image is made for"
    instructions = parse_dockerfile(DOCKERFILES["gpu"])
    for args in pip_installs(instructions):
        for word in args:
            assert not re.fullmatch(r"onnxruntime([<>=!~\[].*)?", word), args
            assert "export" not in word and "tensorflow" not in word, args
    # The project goes in with --no-deps: its own metadata names the CPU onnxruntime.
    assert any("--no-deps" in args and "." in args for args in pip_installs(instructions))
    code = " ".join(i.args for i in instructions)  # comments dropped
    assert "[export]" not in code and "--extra export" not in code


def test_cpu_image_gets_the_cpu_onnxruntime_only() -> None:
    names = image_requirement_names("cpu")
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert not names & TENSORFLOW


def test_requirements_script_refuses_two_onnxruntimes_tensorflow_and_unknown_names() -> None:
    both = run_requirements("--extra", "gpu")
    assert both.returncode == 2 and "both onnxruntime and onnxruntime-gpu" in both.stderr
    tf = run_requirements("--extra", "export")
    assert tf.returncode == 2 and "no TensorFlow" in tf.stderr
    nope = run_requirements("--extra", "no-such-extra")
    assert nope.returncode == 2 and "no such extra" in nope.stderr
    assert run_requirements("--without", "not-a-dep").returncode == 2
    ok = run_requirements("--extra", "gpu,produce", "--without", "onnxruntime")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    base = [r for r in pyproject()["project"]["dependencies"] if not r.startswith("onnxruntime")]
    assert lines == [*base, *extras()["gpu"], *extras()["produce"]]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_entrypoint_is_the_console_script_and_cmd_the_worker(flavour: str) -> None:
    final = final_stage(parse_dockerfile(DOCKERFILES[flavour]))
    (entry,) = [exec_form(i) for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [exec_form(i) for i in final if i.keyword == "CMD"]
    scripts = pyproject()["project"]["scripts"]
    assert entry == ["mmstream"] and "mmstream" in scripts
    assert cmd == ["worker"] and "worker" in subcommands()
    (signal,) = [i.args for i in final if i.keyword == "STOPSIGNAL"]
    assert signal == "SIGTERM"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_python_311_base_and_a_non_root_user(flavour: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[flavour])
    base = args_defaults(instructions)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert froms[-1] == "${PYTHON_IMAGE}"
    final = final_stage(instructions)
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] == UID, users
    created = " ".join(c for c in run_commands(final) if "useradd" in c)
    assert f"--uid {UID}" in created
    # Nothing runs as root after the USER line but the entry point.
    after_user = final[[i.keyword for i in final].index("USER") :]
    assert not [i for i in after_user if i.keyword == "RUN"]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_env_vars_are_the_worker_s_and_the_port_is_exposed(flavour: str) -> None:
    final = final_stage(parse_dockerfile(DOCKERFILES[flavour]))
    env = env_of(final)
    mm = {k: v for k, v in env.items() if k.startswith("MMSTREAM_")}
    assert mm, "no MMSTREAM_* settings"
    assert set(mm) <= known_env()
    assert set(mm) <= env_names_of("worker"), "each one a flag of the CMD (worker)"
    assert mm["MMSTREAM_MODEL"] == "/models/current"
    (exposed,) = [i.args for i in final if i.keyword == "EXPOSE"]
    assert exposed.split("/")[0] == mm["MMSTREAM_HTTP_PORT"] == "8080"
    # With the flags a deployment adds, the image's env makes a valid worker configuration.
    required = {
        "MMSTREAM_BOOTSTRAP_SERVERS": "kafka:9092",
        "MMSTREAM_INPUT_TOPIC": "parts",
        "MMSTREAM_OUTPUT_TOPIC": "predictions",
        "MMSTREAM_GROUP_ID": "mmstream",
    }
    settings = settings_from(["worker"], {**mm, **required})
    config = WorkerConfig.from_mapping({**settings, "sasl_password": ""})
    assert config.http_port == 8080 and config.model == Path("/models/current")
    assert config.device == ("cuda" if flavour == "gpu" else "auto")


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_model_is_baked_from_model_dir_or_mounted_at_models_current(flavour: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[flavour])
    final = final_stage(instructions)
    assert "MODEL_DIR" in args_defaults(final)
    copies = [i.args.split() for i in final if i.keyword == "COPY" and "MODEL_DIR" in i.args]
    assert len(copies) == 1 and copies[0][-1].rstrip("/") == "/models/current", copies
    default = re.fullmatch(r"\$\{MODEL_DIR:-([^}]+)\}", copies[0][0])
    assert default, copies[0][0]
    assert (ROOT / default.group(1)).is_dir() and not ignored(default.group(1))


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(flavour: str) -> None:
    for ins in parse_dockerfile(DOCKERFILES[flavour]):
        if ins.keyword != "COPY" or "--from" in ins.args:
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        for src in words[:-1]:
            if "$" in src:
                continue  # MODEL_DIR: checked above
            assert (ROOT / src).exists(), src
            assert not ignored(src), f"{src} is excluded by .dockerignore"


def test_gpu_image_makes_the_cuda_wheels_libraries_loadable() -> None:
    final = final_stage(parse_dockerfile(DOCKERFILES["gpu"]))
    commands = " ".join(run_commands(final))
    assert "/etc/ld.so.conf.d/" in commands and "ldconfig" in commands
    assert "site-packages/nvidia" in commands and "python3.11" in commands
    for lib in ("libcudart.so.13", "libcublas.so.13", "libcudnn.so.9"):
        assert lib in commands
    # after ldconfig, ldd of ORT's CUDA provider must find everything but the driver's
    check = commands.index("check-cuda-libs /opt/venv/lib/python3.11/site-packages/onnxruntime")
    assert commands.index("ldconfig") < check
    assert "libonnxruntime_providers_cuda.so" in commands[check:].split("&&")[0]


def _shared_lib(path: Path, needs: list[Path]) -> None:
    src = path.with_suffix(".c")
    src.write_text(f"int {path.stem.replace('.', '_')}(void) {{ return 0; }}\n")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(path), f"-Wl,-soname,{path.name}", str(src),
         "-Wl,--no-as-needed", *map(str, needs)],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ldd") is None, reason="no gcc")
def test_the_gpu_image_s_library_check_fails_on_any_missing_library_but_the_driver_s(
    tmp_path: Path,
) -> None:
    """check-cuda-libs.sh on libraries built here: one that links only the driver's
    libcuda.so.1 (absent, as in a build without a GPU) passes; one that also links a library
    the loader cannot find fails, naming it; a missing file is a usage error."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    cuda, cufft = stubs / "libcuda.so.1", stubs / "libcufft.so.12"
    _shared_lib(cuda, [])
    _shared_lib(cufft, [])
    good, bad = tmp_path / "libgood.so", tmp_path / "libbad.so"
    _shared_lib(good, [cuda])
    _shared_lib(bad, [cuda, cufft])
    shutil.rmtree(stubs)  # now neither is where the loader looks
    script = ["sh", str(ROOT / "deploy" / "docker" / "check-cuda-libs.sh")]
    ok = subprocess.run([*script, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([*script, str(good), str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "libcufft.so.12" in failed.stderr and "libcuda.so.1" not in failed.stderr
    absent = subprocess.run([*script, str(tmp_path / "nope.so")], capture_output=True, text=True)
    assert absent.returncode == 2 and "no such file" in absent.stderr


# ================================================================== tests: .dockerignore


def test_dockerignore_keeps_the_context_small_but_the_models_in() -> None:
    for path in (".venv", ".git", ".cache/kafka", ".cache/gpu/whlparts/x.whl", ".pytest_cache"):
        assert ignored(path), path
    for path in ("tests/test_core.py", "worker/__pycache__/cli.cpython-311.pyc", "docs"):
        assert ignored(path), path
    for path in ("pyproject.toml", "constraints.txt", "README.md", "worker/cli/main.py", "export"):
        assert not ignored(path), path
    for path in (".cache/reference-onnx/model.onnx", ".cache/reference-onnx-256/manifest.json"):
        assert not ignored(path), path


# ================================================================== tests: compose.yaml


def test_compose_parses_and_runs_kafka_4_1_1_in_kraft_mode() -> None:
    services = compose()["services"]
    assert {"kafka", "topics", "worker", "producer"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = service_env(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka
    assert services["topics"]["image"] == "apache/kafka:4.1.1"


def test_compose_waits_for_health_and_readiness() -> None:
    services = compose()["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["producer"]["depends_on"]["worker"]["condition"] == "service_healthy"
    probe = " ".join(map(str, worker["healthcheck"]["test"]))
    port = str(container_settings(worker)["http_port"])  # flag, else service env, else image's
    assert f"127.0.0.1:{port}/readyz" in probe
    published = [str(p).rsplit(":", 1)[-1] for p in worker["ports"]]
    assert published == [port]


def test_compose_builds_the_cpu_image_with_extras_that_exist() -> None:
    services = mmstream_services()
    assert set(services) == {"worker", "producer"}
    for name, svc in services.items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DOCKERFILES["cpu"]
        ), name
        wanted = str(build.get("args", {}).get("EXTRAS", ""))
        for extra in filter(None, wanted.split(",")):
            assert extra in extras() and extra != "export", extra
        listed = run_requirements("--extra", wanted)
        assert listed.returncode == 0, listed.stderr
        pinned = pins(ROOT / "constraints.txt")
        for line in listed.stdout.splitlines():
            assert canonicalize_name(Requirement(line).name) in pinned, line
        mounts = [interpolate(v) for v in svc.get("volumes", [])]
        assert any(m.split(":")[1] == "/models/current" for m in mounts), mounts


@pytest.mark.parametrize("service", ["worker", "producer"])
def test_compose_commands_flags_and_env_are_the_cli_s(service: str) -> None:
    svc = mmstream_services()[service]
    command = service_command(svc)
    sub = command[0]
    assert sub in subcommands()
    for word in command[1:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in flags_of(sub), f"{sub} has no {word}"
    env = service_env(svc)
    mm = {k: v for k, v in env.items() if k.startswith("MMSTREAM_")}
    assert set(mm) <= known_env()
    assert set(mm) <= env_names_of(sub), f"not flags of {sub}: {set(mm) - env_names_of(sub)}"
    settings = container_settings(svc)
    if sub == "worker":
        WorkerConfig.from_mapping({**settings, "sasl_password": ""})
    else:
        ProduceConfig.from_mapping(settings)


def test_compose_creates_every_topic_the_worker_and_producer_use() -> None:
    services = compose()["services"]
    script = interpolate(" ".join(map(str, services["topics"]["command"])))
    loop = re.search(r"for topic in ([^;]+);", script)
    assert loop, script
    created = set(loop.group(1).split())
    worker = service_env(services["worker"])
    used = {worker["MMSTREAM_INPUT_TOPIC"], worker["MMSTREAM_OUTPUT_TOPIC"]}
    used.add(worker.get("MMSTREAM_DLQ_TOPIC") or f"{worker['MMSTREAM_INPUT_TOPIC']}.dlq")
    producer = service_command(services["producer"])
    used.add(producer[producer.index("--topic") + 1])
    assert used <= created, used - created
    assert service_env(services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_a_wheelhouse_when_given_is_the_build_s_only_package_source(flavour: str) -> None:
    """WHEELHOUSE (a folder in the context, `make wheelhouse`) becomes /wheels; with wheels
    there, pip's config says no-index + find-links /wheels before any pip install runs."""
    build = parse_dockerfile(DOCKERFILES[flavour])
    args = [i.args for i in build if i.keyword == "ARG"]
    assert 'WHEELHOUSE=""' in args
    copies = [i.args for i in build if i.keyword == "COPY" and "WHEELHOUSE" in i.args]
    assert copies == ["${WHEELHOUSE:-deploy/docker/no-wheelhouse} /wheels/"]
    placeholder = ROOT / "deploy" / "docker" / "no-wheelhouse"
    assert placeholder.is_dir() and not list(placeholder.glob("*.whl"))
    runs = [i.args for i in build if i.keyword == "RUN"]
    config = next(k for k, r in enumerate(runs) if "/etc/pip.conf" in r)
    assert "no-index = true" in runs[config] and "find-links = /wheels" in runs[config]
    assert all("pip install" not in r for r in runs[:config])
    # a Debian base (the image test's) names its interpreter python3 only
    assert "python3 -m venv /opt/venv" in runs[0]
    assert not ignored(".cache/wheelhouse-cpu/x.whl") and not ignored(".cache/wheelhouse-gpu/x.whl")
