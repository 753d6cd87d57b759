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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from worker.contract.errors import ConfigError

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


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"--{name.replace('_', '-')} must be one of {list(allowed)}, not {value!r}"
        )


def _positive(name: str, value: int, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if zero_ok else '> 0'}")


#: ``--compression-type`` values: what mmstream's producers compress their batches with.
#: Every codec decodes from the base install (kafka-python's lz4/snappy/zstd extras).
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")


def check_compression(value: str) -> None:
    """ConfigError unless ``value`` is one of :data:`COMPRESSION_TYPES`."""
    _choice("compression_type", value, COMPRESSION_TYPES)


def add_compression_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--compression-type`` (worker, produce, replay): how ``what`` is compressed."""
    p.add_argument(
        "--compression-type",
        choices=COMPRESSION_TYPES,
        default="none",
        help=f"compression of {what} (batches of records; consumers decode any of these)",
    )


#: The one secret: read from the environment only, never from a flag, never logged.
SASL_PASSWORD_ENV = "MMSTREAM_SASL_PASSWORD"


@dataclass(frozen=True, kw_only=True)
class KafkaSecurity:
    """Kafka security settings, shared by every command that talks to a cluster.

    The SASL password comes only from ``MMSTREAM_SASL_PASSWORD`` or
    ``--sasl-password-file`` (never a flag) and is kept out of ``repr``.
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def _check_security(self) -> None:
        _choice(
            "security_protocol",
            self.security_protocol,
            ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        )
        if self.security_protocol.startswith("SASL"):
            _choice(
                "sasl_mechanism",
                self.sasl_mechanism,
                ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
            )
            if not self.sasl_username:
                raise ConfigError(f"--sasl-username is required with {self.security_protocol}")
            if self.sasl_password_file is not None:
                try:
                    secret = Path(self.sasl_password_file).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"--sasl-password-file: {exc.strerror}") from exc
                # A copy (dataclasses.replace: --processes children) carries the file's
                # password already; a different one came from the environment as well.
                if self.sasl_password and self.sasl_password != secret:
                    raise ConfigError("give the SASL password by env or by file, not both")
                object.__setattr__(self, "sasl_password", secret)
            if not self.sasl_password:
                raise ConfigError(
                    "a SASL password is required: MMSTREAM_SASL_PASSWORD or --sasl-password-file"
                )
        elif self.sasl_mechanism or self.sasl_username:
            raise ConfigError("--sasl-* settings need --security-protocol SASL_PLAINTEXT/SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"--{name.replace('_', '-')}: no such file {value}")

    def security_settings(self) -> dict[str, Any]:
        """These settings as config keys for another config (password resolved, no file)."""
        names = [f.name for f in dataclasses.fields(KafkaSecurity)]
        out = {n: getattr(self, n) for n in names}
        out["sasl_password_file"] = None
        return out

    def kafka_security(self) -> dict[str, Any]:
        """kafka-python keyword arguments for the security settings (secrets included)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            out.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        return out


@dataclass(frozen=True)
class WorkerConfig(KafkaSecurity, FrozenConfig):
    """Settings of ``mmstream worker``; see ``mmstream worker --help`` for each."""

    bootstrap_servers: str
    input_topic: str
    output_topic: str
    group_id: str
    model: Path
    dlq_topic: str = ""
    max_batch_size: int = 32
    max_batch_delay_ms: int = 10
    inference_queue: int = -1  # auto: see Worker
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
    log_format: str = "text"
    guarantee: str = "at-least-once"
    transactional_id: str = ""
    assembly_timeout_ms: int = 30_000
    on_incomplete: str = "dlq"
    max_pending_events: int = 10_000
    max_pending_bytes: int = 512 * 1024 * 1024
    group_instance_id: str = ""
    processes: int = 1
    session_timeout_ms: int = 45_000
    http_port: int = 0
    http_host: str = "0.0.0.0"
    stall_timeout_s: float = 60.0
    compression_type: str = "none"

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
        if self.inference_queue < -1:
            raise ConfigError("--inference-queue must be -1 (auto) or >= 0")
        for name in (
            "max_batch_delay_ms",
            "intra_op_threads",
            "max_events",
            "commit_interval_ms",
        ):
            _positive(name, getattr(self, name), zero_ok=True)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("--auto-offset-reset must be earliest or latest")
        if self.shutdown_timeout_s <= 0:
            raise ConfigError("--shutdown-timeout-s must be > 0")
        if not self.stall_timeout_s > 0:  # also refuses NaN
            raise ConfigError("--stall-timeout-s must be > 0")
        _choice("log_format", self.log_format, ("text", "json"))
        _choice("guarantee", self.guarantee, ("at-least-once", "exactly-once"))
        _choice("on_incomplete", self.on_incomplete, ("dlq", "drop", "infer"))
        check_compression(self.compression_type)
        for name in ("max_pending_events", "max_pending_bytes", "session_timeout_ms", "processes"):
            _positive(name, getattr(self, name))
        for name in ("assembly_timeout_ms", "http_port"):
            _positive(name, getattr(self, name), zero_ok=True)
        if self.max_events and self.processes > 1:
            raise ConfigError("--max-events counts one process's predictions: use --processes 1")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError("--http-port must be within 0..65535 (0 = no HTTP server)")
        if self.guarantee == "exactly-once" and not self.transactional_id:
            # One id per consumer instance: a restarted pod fences its zombie predecessor.
            suffix = self.group_instance_id or self.client_id
            object.__setattr__(self, "transactional_id", f"{self.group_id}-{suffix}")
        self._check_security()


# ------------------------------------------------------------ env vars for argparse


def add_security_args(p: argparse.ArgumentParser) -> None:
    """The Kafka security flags of :class:`KafkaSecurity` (worker, replay, archive)."""
    p.add_argument(
        "--security-protocol",
        default="PLAINTEXT",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        help="Kafka security protocol",
    )
    p.add_argument(
        "--sasl-mechanism",
        default="",
        help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)",
    )
    p.add_argument("--sasl-username", default="", help="SASL user name")
    p.add_argument(
        "--sasl-password-file",
        type=Path,
        default=None,
        help=f"file holding the SASL password (or set {SASL_PASSWORD_ENV}; never a flag)",
    )
    p.add_argument("--ssl-cafile", type=Path, default=None, help="CA bundle to verify brokers")
    p.add_argument("--ssl-certfile", type=Path, default=None, help="client certificate (mTLS)")
    p.add_argument("--ssl-keyfile", type=Path, default=None, help="client private key (mTLS)")


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
