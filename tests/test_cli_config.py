"""Config objects, env vars, the CLI's error contract, and the schemas' enums."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli.main import build_parser, main
from worker.config import WorkerConfig, check_unknown_env
from worker.contract.errors import ConfigError, MMStreamError, Reason

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "bootstrap_servers": "b:9092",
    "input_topic": "in",
    "output_topic": "out",
    "group_id": "g",
    "model": "m",
}


def test_worker_config_is_frozen_and_rejects_unknown_keys() -> None:
    cfg = WorkerConfig.from_mapping(BASE)
    assert cfg.dlq_topic == "in.dlq" and cfg.max_batch_size == 32
    with pytest.raises(AttributeError):
        cfg.max_batch_size = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown setting"):
        WorkerConfig.from_mapping({**BASE, "max_batch_sise": 8})
    with pytest.raises(ConfigError, match="missing setting"):
        WorkerConfig.from_mapping({k: v for k, v in BASE.items() if k != "group_id"})


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"device": "tpu"},
        {"output_topic": "in"},
        {"max_batch_delay_ms": -1},
        {"bootstrap_servers": ""},
    ],
)
def test_worker_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WorkerConfig.from_mapping({**BASE, **bad})


def test_every_flag_reads_its_env_var_and_help_names_it() -> None:
    env = {"MMSTREAM_MAX_BATCH_SIZE": "8", "MMSTREAM_INPUT_TOPIC": "from-env"}
    parser = build_parser(env)
    worker_args = [
        "worker",
        "--bootstrap-servers",
        "b",
        "--output-topic",
        "o",
        "--group-id",
        "g",
        "--model",
        "m",
    ]
    args = parser.parse_args(worker_args)
    assert args.max_batch_size == 8 and args.input_topic == "from-env"
    flag_wins = parser.parse_args([*worker_args, "--max-batch-size", "4"])
    assert flag_wins.max_batch_size == 4
    help_text = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for action in build_parser({})._subparsers._group_actions[0].choices["worker"]._actions:  # type: ignore[union-attr]
        if action.option_strings and action.dest != "help":
            assert f"MMSTREAM_{action.dest.upper()}" in help_text


def test_unknown_mmstream_env_var_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MMSTREAM_MAX_BATCH_SIZ"):
        check_unknown_env({"MMSTREAM_MAX_BATCH_SIZE"}, {"MMSTREAM_MAX_BATCH_SIZ": "3"})


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MMSTREAM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=60,
    )


def test_missing_model_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = run_cli(
        "worker",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--input-topic",
        "i",
        "--output-topic",
        "o",
        "--group-id",
        "g",
        "--model",
        str(tmp_path / "nope"),
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "manifest.json" in lines[0], r.stderr


def test_bad_flag_value_and_unknown_env_are_one_line_errors() -> None:
    r = run_cli("produce", "--bootstrap-servers", "b", "--topic", "t", "--count", "many")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("produce", "--bootstrap-servers", "b", "--topic", "t", env={"MMSTREAM_COUNTT": "3"})
    assert r.returncode == 2 and "MMSTREAM_COUNTT" in r.stderr


def test_main_maps_error_kinds_to_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from worker.contract.errors import BrokerError, InferenceError

    assert main(["produce", "--bootstrap-servers", "b", "--topic", "t", "--count", "0"]) == 2
    cli = importlib.import_module("worker.cli.main")  # worker.cli.main is also the function
    for error, code in [
        (BrokerError("down"), 1),
        (InferenceError("ORT"), 1),
        (ConfigError("x"), 2),
    ]:

        def handler(_args: object, error: MMStreamError = error) -> int:
            raise error

        monkeypatch.setattr(cli, "_cmd_produce", handler)
        assert main(["produce", "--bootstrap-servers", "b", "--topic", "t"]) == code


def test_worker_cli_does_not_import_tensorflow() -> None:
    code = (
        "import sys; from worker.cli.main import build_parser; build_parser({}); "
        "print('onnxruntime' in sys.modules); "
        "import worker.core.pipeline, worker.tools.demo; print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.split() == ["False", "False"]  # parsing loads neither ONNX Runtime nor TF


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("worker", "worker.cli.worker"),
        ("produce", "worker.cli.produce"),
        ("archive", "worker.cli.archive"),
        ("replay", "worker.cli.replay"),
        ("demo", "worker.cli.demo"),
        ("bench", "worker.cli.bench"),
        ("train-reference", "export.commands"),
        ("export", "export.commands"),
    ],
)
def test_each_command_is_handled_by_its_own_module(command: str, module: str) -> None:
    import argparse

    sub = next(a for a in build_parser({})._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices[command].get_default("handler").__module__ == module


def test_errors_share_one_root_with_retriable_flag() -> None:
    from worker.contract.errors import BrokerError, ExportError, RecordError

    assert BrokerError("x").retriable and not ExportError("x").retriable
    assert BrokerError("x").exit_code == 1 and ExportError("x").exit_code == 2
    assert issubclass(RecordError, MMStreamError)
    assert not RecordError(Reason.DECODE_ERROR, "x").retriable


def test_dead_letter_schema_lists_exactly_the_reason_codes() -> None:
    schema = json.loads((ROOT / "schemas" / "dead-letter-headers.schema.json").read_text())
    assert set(schema["properties"]["mm-error"]["enum"]) == {r.value for r in Reason}


def test_sasl_password_only_from_env_or_file_and_never_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-from-file\n")
    sasl = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "svc",
    }
    cfg = WorkerConfig.from_mapping({**BASE, **sasl, "sasl_password_file": secret})
    assert cfg.sasl_password == "s3cret-from-file" and "s3cret" not in repr(cfg)
    assert cfg.kafka_security()["sasl_plain_password"] == "s3cret-from-file"
    with pytest.raises(ConfigError, match="SASL password is required"):
        WorkerConfig.from_mapping({**BASE, **sasl})
    with pytest.raises(ConfigError, match="one of"):
        WorkerConfig.from_mapping({**BASE, **sasl, "sasl_mechanism": "GSSAPI"})
    parser = build_parser({})
    worker_actions = parser._subparsers._group_actions[0].choices["worker"]._actions  # type: ignore[union-attr]
    assert not any("--sasl-password" in a.option_strings for a in worker_actions)


def test_exactly_once_gets_a_transactional_id_per_instance() -> None:
    cfg = WorkerConfig.from_mapping(
        {**BASE, "guarantee": "exactly-once", "group_instance_id": "pod-3"}
    )
    assert cfg.transactional_id == "g-pod-3"


def test_json_log_format_is_one_object_per_line() -> None:
    import logging

    from worker.ops.logs import JsonFormatter

    record = logging.LogRecord("worker.x", logging.WARNING, "f", 1, "took %d ms", (5,), None)
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["msg"] == "took 5 ms" and parsed["level"] == "WARNING" and "\n" not in line


def test_every_worker_setting_has_a_flag_and_every_flag_a_setting() -> None:
    import dataclasses

    parser = build_parser({})
    actions = parser._subparsers._group_actions[0].choices["worker"]._actions  # type: ignore[union-attr]
    flags = {a.dest for a in actions if a.option_strings and a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(WorkerConfig)}
    # The SASL password is the one setting with no flag: environment or file only.
    assert fields - flags == {"sasl_password"}
    assert flags - fields == set()


@pytest.mark.parametrize(
    ("command", "module", "cls"),
    [
        ("produce", "worker.tools.produce", "ProduceConfig"),
        ("demo", "worker.tools.demo", "DemoConfig"),
        ("bench", "worker.tools.bench.config", "BenchConfig"),
    ],
)
def test_other_commands_flags_match_their_config(command: str, module: str, cls: str) -> None:
    import dataclasses
    import importlib

    config_cls = getattr(importlib.import_module(module), cls)
    parser = build_parser({})
    actions = parser._subparsers._group_actions[0].choices[command]._actions  # type: ignore[union-attr]
    flags = {a.dest for a in actions if a.option_strings and a.dest != "help"}
    # The SASL password (of those with the Kafka security settings) has no flag.
    assert flags == {f.name for f in dataclasses.fields(config_cls)} - {"sasl_password"}
