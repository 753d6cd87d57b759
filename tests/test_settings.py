"""Settings declared once: the config dataclasses' fields are the CLI's flags.

The helper (``worker.config.setting`` / ``add_config_args`` / ``config_from_args``) on
a small config of its own, then every real command: each flag's default, type and
choices in argparse are the dataclass field's, and the config itself refuses a
value outside a field's choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.backfill.archive_copy import ArchiveConfig
from worker.backfill.ranges import RangeSettings
from worker.backfill.replay import ReplayConfig
from worker.cli.main import build_parser
from worker.config import (
    DEVICES,
    SASL_PASSWORD_ENV,
    SETTING,
    FrozenConfig,
    KafkaSecurity,
    WorkerConfig,
    add_config_args,
    bind_env,
    config_from_args,
    setting,
    setting_from,
    settings_of,
)
from worker.contract.errors import ConfigError
from worker.tools.bench.config import BenchConfig
from worker.tools.demo import DemoConfig
from worker.tools.produce import ProduceConfig

TOY_SECRET_ENV = "MMSTREAM_TOY_SECRET"


@dataclass(frozen=True)
class Toy(FrozenConfig):
    name: str = setting(help="a name")
    count: int = setting(3, help="how many, at 100%")
    ratio: float = setting(0.5, help="a share")
    mode: str = setting("a", choices=("a", "b"), help="the mode")
    path: Path | None = setting(None, help="a file")
    out: Path = setting(Path("out"), help="a directory")
    verbose: bool = setting(False, help="say more")
    items: tuple[str, ...] = setting((), flag="item", metavar="ITEM", help="repeatable")
    secret: str = setting("", flag=False, env=TOY_SECRET_ENV, repr=False, help="env only")


def toy_parser(environ: dict[str, str] | None = None) -> tuple[argparse.ArgumentParser, set[str]]:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_args(parser, Toy)
    return parser, bind_env(parser, environ or {})


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


# ------------------------------------------------------------------ the helper


def test_flag_type_default_choices_help_and_env_come_from_the_field() -> None:
    parser, env_names = toy_parser()
    by_flag = actions(parser)
    assert set(by_flag) == {
        "-h",
        "--name",
        "--count",
        "--ratio",
        "--mode",
        "--path",
        "--out",
        "--verbose",
        "--item",
    }
    assert by_flag["--name"].required and by_flag["--name"].type is None
    assert (by_flag["--count"].type, by_flag["--count"].default) == (int, 3)
    assert (by_flag["--ratio"].type, by_flag["--ratio"].default) == (float, 0.5)
    assert by_flag["--mode"].choices == ("a", "b") and by_flag["--mode"].default == "a"
    assert (by_flag["--path"].type, by_flag["--path"].default) == (Path, None)
    assert (by_flag["--out"].type, by_flag["--out"].default) == (Path, Path("out"))
    assert isinstance(by_flag["--verbose"], argparse._StoreTrueAction)
    item = by_flag["--item"]
    assert (item.dest, item.metavar, item.default) == ("item", "ITEM", ())
    help_text = parser.format_help()
    assert "how many, at 100% (default: 3) [env: MMSTREAM_COUNT]" in " ".join(help_text.split())
    assert "[env: MMSTREAM_ITEM]" in item.help  # type: ignore[operator]
    # The non-flag setting is no flag, but its variable is a known one.
    assert "--secret" not in help_text
    assert TOY_SECRET_ENV in env_names and "MMSTREAM_NAME" in env_names


def test_parsed_flags_and_the_settings_variable_build_the_config() -> None:
    parser, _ = toy_parser({"MMSTREAM_COUNT": "9", "MMSTREAM_ITEM": "from-env"})
    args = parser.parse_args(["--name", "n", "--mode", "b", "--verbose"])
    config = config_from_args(Toy, args, {TOY_SECRET_ENV: "s3cret"})
    assert (config.name, config.count, config.mode, config.verbose) == ("n", 9, "b", True)
    assert config.items == "from-env"  # the variable's raw string (a config may split it)
    assert config.secret == "s3cret" and "s3cret" not in repr(config)
    flag_wins = parser.parse_args(["--name", "n", "--item", "x", "--item", "y"])
    assert config_from_args(Toy, flag_wins, {}).items == ("x", "y")  # replaces, never adds
    assert config_from_args(Toy, flag_wins, {}).secret == ""


def test_a_choice_outside_the_list_is_refused_by_argparse_and_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"--mode must be one of \['a', 'b'\], not 'c'"):
        Toy(name="n", mode="c")
    with pytest.raises(ConfigError, match="--mode must be one of"):
        Toy.from_mapping({"name": "n", "mode": "A"})
    parser, _ = toy_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--name", "n", "--mode", "c"])
    assert exit_info.value.code == 2


def counted(default: int) -> type[FrozenConfig]:
    """A config whose one setting has this default (as if someone edited the class)."""
    return dataclasses.make_dataclass(
        "Counted",
        [("count", int, setting(default, help="how many"))],
        bases=(FrozenConfig,),
        frozen=True,
    )


@pytest.mark.parametrize("default", [5, 17])
def test_a_default_changed_in_the_dataclass_shows_in_help_and_parses(default: int) -> None:
    parser = argparse.ArgumentParser(prog="counted")
    add_config_args(parser, counted(default))
    assert f"how many (default: {default})" in parser.format_help()
    assert parser.parse_args([]).count == default


def test_setting_from_reuses_a_field_with_a_help_of_its_own() -> None:
    replay = {f.name: (f, s) for f, s in settings_of(ReplayConfig)}
    worker = {f.name: (f, s) for f, s in settings_of(WorkerConfig)}
    f, s = replay["device"]
    assert f.default == worker["device"][0].default == "auto"
    assert s.choices == worker["device"][1].choices == DEVICES
    assert s.help == "ONNX Runtime device" != worker["device"][1].help
    # An inherited range flag keeps its name and keyword-only-ness, with replay's own help.
    base = {f.name: (f, s) for f, s in settings_of(RangeSettings)}
    assert replay["from_time"][1].flag == base["from_time"][1].flag == "from"
    assert replay["from_time"][0].kw_only is True
    assert replay["from_time"][1].help != base["from_time"][1].help
    with pytest.raises(ConfigError, match="no setting"):
        setting_from(WorkerConfig, "no_such_field")


@pytest.mark.parametrize(
    ("annotation", "field"),
    [
        (bool, setting(True, help="a flag that could never be switched off")),
        (list[int], setting((), help="no flag for this type")),
    ],
    ids=["bool-default-true", "unsupported-type"],
)
def test_a_setting_argparse_cannot_express_is_refused(annotation: Any, field: Any) -> None:
    cls = dataclasses.make_dataclass("Bad", [("x", annotation, field)], bases=(FrozenConfig,))
    with pytest.raises(ConfigError, match="--x"):
        add_config_args(argparse.ArgumentParser(), cls)


def test_env_is_only_for_non_flag_settings() -> None:
    with pytest.raises(ConfigError, match="non-flag"):
        setting("", env="MMSTREAM_X", help="a flag has its own variable")


def test_the_sasl_password_is_a_non_flag_setting_read_from_one_variable() -> None:
    (password,) = (s for f, s in settings_of(KafkaSecurity) if f.name == "sasl_password")
    assert password.flag is None and password.env == SASL_PASSWORD_ENV
    assert SASL_PASSWORD_ENV in build_parser({}).get_default("known_env")
    sasl = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "--sasl-username", "u"]
    archive = ["archive", "--bootstrap-servers", "b", "--source-topic", "t", "--dry-run"]
    args = build_parser({}).parse_args([*archive, *sasl])
    config = config_from_args(ArchiveConfig, args, {SASL_PASSWORD_ENV: "pw"})
    assert config.kafka_security()["sasl_plain_password"] == "pw"


# ------------------------------------------------------------------ every command

CONFIGS: dict[str, type[Any]] = {
    "worker": WorkerConfig,
    "produce": ProduceConfig,
    "archive": ArchiveConfig,
    "replay": ReplayConfig,
    "demo": DemoConfig,
    "bench": BenchConfig,
}
#: A valid mapping per config (only what it requires).
VALID: dict[type[Any], dict[str, Any]] = {
    WorkerConfig: {
        "bootstrap_servers": "b:9092",
        "input_topic": "in",
        "output_topic": "out",
        "group_id": "g",
        "model": "m",
    },
    ProduceConfig: {"bootstrap_servers": "b:9092", "topic": "t"},
    ArchiveConfig: {"bootstrap_servers": "b:9092", "source_topic": "t", "dry_run": True},
    ReplayConfig: {
        "bootstrap_servers": "b:9092",
        "source_topic": "in",
        "model": "m",
        "ranges": "0:0-",
    },
    DemoConfig: {},
    BenchConfig: {"bootstrap_servers": "b:9092", "model": "m"},
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser({})._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_with_a_config_is_covered() -> None:
    assert set(subcommands()) - set(CONFIGS) == {"train-reference", "export"}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_each_flags_default_type_and_choices_are_its_fields(command: str) -> None:
    cls = CONFIGS[command]
    by_dest = {a.dest: a for a in subcommands()[command]._actions if a.option_strings}
    del by_dest["help"]
    fields = {s.dest: (f, s) for f, s in settings_of(cls) if s.flag is not None}
    assert set(by_dest) == set(fields), command
    not_flags = {f.name for f in dataclasses.fields(cls)} - {f.name for f, _ in fields.values()}
    assert not_flags <= {"sasl_password"}, command  # only the secret is no flag
    for dest, action in by_dest.items():
        f, s = fields[dest]
        assert action.option_strings == [f"--{s.flag}"]
        if f.default is dataclasses.MISSING:
            assert action.required, dest
        else:
            assert not action.required and action.default == f.default, dest
            assert type(action.default) is type(f.default), dest
        assert action.choices == s.choices, dest
        assert (action.help or "").startswith(s.help.replace("%", "%%")), dest


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_each_config_refuses_a_value_outside_any_fields_choices(cls: type[Any]) -> None:
    cls.from_mapping(VALID[cls])  # the base is valid
    with_choices = [(f, s) for f, s in settings_of(cls) if s.choices]
    assert with_choices, cls
    for f, s in with_choices:
        assert f.default in s.choices, f.name  # and so is each default
        with pytest.raises(ConfigError, match=f"--{s.flag} must be one of"):
            cls.from_mapping({**VALID[cls], f.name: "no-such-choice"})


def test_the_device_choices_are_one_constant() -> None:
    for cls in (WorkerConfig, ReplayConfig, DemoConfig, BenchConfig):
        (device,) = (f for f in dataclasses.fields(cls) if f.name == "device")
        assert device.metadata[SETTING].choices is DEVICES, cls


def test_replay_and_archive_commands_map_flags_and_the_password_onto_their_configs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    import worker.backfill.archive_copy as archive_copy
    import worker.backfill.replay as replay
    import worker.cli.replay as replay_command

    cli = importlib.import_module("worker.cli.main")  # worker.cli.main is also the function

    seen: list[Any] = []

    def run_replay(config: ReplayConfig, stop: threading.Event) -> dict[str, Any]:
        seen.append(config)
        return {}

    def run_archive(config: ArchiveConfig) -> dict[str, Any]:
        seen.append(config)
        return {}

    monkeypatch.setattr(replay, "run_replay", run_replay)
    monkeypatch.setattr(archive_copy, "run_archive", run_archive)
    # Neither the test process's signal handlers nor its logging are the command's to change.
    monkeypatch.setattr(replay_command, "stop_on_signals", lambda _what: threading.Event())
    for module in (cli, replay_command):
        monkeypatch.setattr(module, "configure_logging", lambda *_args: None)
    for name in [k for k in os.environ if k.startswith("MMSTREAM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(SASL_PASSWORD_ENV, "pw")
    monkeypatch.setenv("MMSTREAM_RANGE", "0:1-2")
    sasl = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "--sasl-username", "u"]
    common = ["--bootstrap-servers", "b:9092", "--source-topic", "in", *sasl]
    assert cli.main(["replay", *common, "--model", "m", "--range", "1:5-"]) == 0
    assert cli.main(["archive", *common, "--dry-run"]) == 0
    capsys.readouterr()
    replayed, archived = seen
    assert isinstance(replayed, ReplayConfig) and isinstance(archived, ArchiveConfig)
    assert replayed.ranges == ("1:5-",) and archived.ranges == ("0:1-2",)  # the flag wins
    assert replayed.sasl_password == archived.sasl_password == "pw"
    assert (replayed.from_time, replayed.to_time, replayed.model) == ("", "", Path("m"))
