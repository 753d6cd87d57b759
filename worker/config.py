"""Configuration: one frozen object per process, built from flags and ``MMSTREAM_*`` env vars.

Every CLI flag ``--some-flag`` can also be given as ``MMSTREAM_SOME_FLAG``
(the flag wins); ``--help`` names the variable. A mapping with a key the
config does not know is refused, and so is an ``MMSTREAM_*`` variable that
matches no flag: a misspelt setting is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from worker.errors import ConfigError

ENV_PREFIX = "MMSTREAM_"
#: Variables read by the project's scripts, not by the CLI.
ENV_NOT_FLAGS = frozenset({"MMSTREAM_CACHE_DIR"})


class FrozenConfig:
    """Mixin for frozen dataclass configs: strict construction from a mapping."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown setting(s) {unknown}")
        missing = sorted(
            n
            for n, f in fields.items()
            if n not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"{cls.__name__}: missing setting(s) {missing}")
        return cls(**values)


def _positive(name: str, value: int, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if zero_ok else '> 0'}")


@dataclass(frozen=True)
class WorkerConfig(FrozenConfig):
    """Settings of ``mmstream worker``; see ``mmstream worker --help`` for each."""

    bootstrap_servers: str
    input_topic: str
    output_topic: str
    group_id: str
    model: Path
    dlq_topic: str = ""
    max_batch_size: int = 32
    max_batch_delay_ms: int = 10
    device: str = "auto"
    intra_op_threads: int = 0
    max_part_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    commit_interval_ms: int = 500
    max_poll_records: int = 500
    auto_offset_reset: str = "earliest"
    client_id: str = "mmstream-worker"
    max_events: int = 0
    shutdown_timeout_s: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("bootstrap_servers", "input_topic", "output_topic", "group_id"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if not self.dlq_topic:
            object.__setattr__(self, "dlq_topic", f"{self.input_topic}.dlq")
        if len({self.input_topic, self.output_topic, self.dlq_topic}) != 3:
            raise ConfigError("--input-topic, --output-topic and --dlq-topic must all differ")
        object.__setattr__(self, "model", Path(self.model))
        for name in ("max_batch_size", "max_part_bytes", "max_image_pixels", "max_poll_records"):
            _positive(name, getattr(self, name))
        for name in ("max_batch_delay_ms", "intra_op_threads", "max_events", "commit_interval_ms"):
            _positive(name, getattr(self, name), zero_ok=True)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("--auto-offset-reset must be earliest or latest")
        if self.shutdown_timeout_s <= 0:
            raise ConfigError("--shutdown-timeout-s must be > 0")


# ------------------------------------------------------------ env vars for argparse


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _parse_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true/false")


def bind_env(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> set[str]:
    """Let every optional flag of ``parser`` default to its ``MMSTREAM_*`` variable.

    Appends ``[env: NAME]`` to each help text. Returns the variable names bound.
    """
    names = set()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = env_name(action.dest)
        names.add(name)
        action.help = f"{action.help or ''} [env: {name}]".strip()
        if name not in environ:
            continue
        raw = environ[name]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            action.default = _parse_bool(name, raw)
        else:
            action.default = raw  # argparse applies `type` to string defaults
        action.required = False
    return names


def check_unknown_env(known: set[str], environ: Mapping[str, str]) -> None:
    unknown = sorted(
        k for k in environ if k.startswith(ENV_PREFIX) and k not in known | ENV_NOT_FLAGS
    )
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {unknown}: no such flag")


def env_snapshot() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
