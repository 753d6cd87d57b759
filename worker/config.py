"""Configuration: one frozen object per process; its fields are the command's flags.

Every setting is declared once, as a field of the command's config dataclass
(:func:`setting`: default, help, choices, flag name, metavar), and
:func:`add_config_args` builds the argparse arguments from those fields, so a
default or a choice list is never written twice. Every CLI flag
``--some-flag`` can also be given as ``MMSTREAM_SOME_FLAG`` (the flag wins);
``--help`` names the variable (:func:`bind_env`). A mapping with a key the
config does not know is refused, and so is an ``MMSTREAM_*`` variable that
matches no flag: a misspelt setting is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, overload

from worker.contract.errors import ConfigError

ENV_PREFIX = "MMSTREAM_"
#: Variables read by the project's scripts, not by the CLI.
ENV_NOT_FLAGS = frozenset({"MMSTREAM_CACHE_DIR"})

T = TypeVar("T")
C = TypeVar("C", bound="FrozenConfig")

# ------------------------------------------------------------------ choices

#: ``--device``: the ONNX Runtime device (auto = CUDA when it works, else CPU).
DEVICES = ("auto", "cpu", "cuda")
#: ``--compression-type`` values: what mmstream's producers compress their batches with.
#: Every codec decodes from the base install (kafka-python's lz4/snappy/zstd extras).
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")
#: ``--guarantee``: delivery guarantee of predictions and dead letters.
GUARANTEES = ("at-least-once", "exactly-once")
#: ``--on-incomplete``: what happens to an event whose parts never all arrived.
ON_INCOMPLETE = ("dlq", "drop", "infer")
#: ``--log-format``.
LOG_FORMATS = ("text", "json")
#: ``--content`` (produce, demo, bench): raw media or the model's tensors as ``.npy``.
CONTENTS = ("raw", "npy")
#: ``--security-protocol`` (Kafka's names).
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: ``--kafka-client``: the Kafka client library behind :mod:`worker.edge.client`.
KAFKA_CLIENTS = ("kafka-python", "confluent")
#: ``--sasl-mechanism`` with a SASL_* protocol.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

#: The one secret: read from the environment only, never from a flag, never logged.
SASL_PASSWORD_ENV = "MMSTREAM_SASL_PASSWORD"

# ------------------------------------------------------------------ settings

#: Key of a field's :class:`Setting` in ``dataclasses.Field.metadata``.
SETTING = "mmstream.setting"
#: Namespace entries that are not settings (set by the CLI's parser).
NOT_SETTINGS = frozenset({"command", "handler", "known_env"})
#: Attribute of a parser: the environment variables its non-flag settings read.
_ENV_ONLY_ATTR = "mmstream_env_only"


@dataclass(frozen=True)
class Setting:
    """What a config field says about itself as a command-line setting.

    Attributes:
        help: the ``--help`` text (the default and ``[env: ...]`` are appended).
        choices: the allowed values; refused otherwise by argparse and by the config.
        flag: the option name without ``--`` (default: the field name with dashes);
            None: not a flag at all.
        metavar: argparse's metavar.
        env: for a non-flag setting, the one variable it is read from.
    """

    help: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | None = None
    env: str = ""

    @property
    def dest(self) -> str:
        """The argparse dest (and so the ``MMSTREAM_*`` name) of the flag."""
        return (self.flag or "").replace("-", "_")

    @property
    def option(self) -> str:
        """``--the-flag`` (what error messages name), also for a non-flag setting."""
        return f"--{self.flag}" if self.flag else self.env


@overload
def setting(
    *,
    help: str,
    choices: Sequence[str] | None = ...,
    flag: bool | str = ...,
    metavar: str | None = ...,
    env: str = ...,
    repr: bool = ...,
) -> Any: ...
@overload
def setting(
    default: T,
    *,
    help: str,
    choices: Sequence[str] | None = ...,
    flag: bool | str = ...,
    metavar: str | None = ...,
    env: str = ...,
    repr: bool = ...,
) -> T: ...
def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    flag: bool | str = True,
    metavar: str | None = None,
    env: str = "",
    repr: bool = True,
) -> Any:
    """A config field that is also a command-line setting (``dataclasses.field``).

    Args:
        default: the default; without one the flag is required.
        help: the ``--help`` text.
        choices: the allowed values (argparse refuses others, and so does the
            config: :meth:`FrozenConfig.__post_init__`).
        flag: True: ``--<field-name-with-dashes>``; a string: that name instead
            (``"from"`` -> ``--from``, ``MMSTREAM_FROM``); False: no flag.
        metavar: argparse's metavar.
        env: only with ``flag=False``: the environment variable the CLI reads it from.
        repr: False keeps the value out of ``repr`` (secrets).
    """
    if env and flag is not False:
        raise ConfigError(f"setting {help!r}: env= is for non-flag settings (flags get theirs)")
    meta = Setting(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        flag=None if flag is False else (flag if isinstance(flag, str) else ""),
        metavar=metavar,
        env=env,
    )
    return dataclasses.field(default=default, repr=repr, metadata={SETTING: meta})


def setting_from(cls: type[Any], name: str, *, help: str | None = None) -> Any:
    """Field ``name`` of config ``cls`` again, for another config: same default, choices,
    flag name, ``repr`` and keyword-only-ness; ``help`` replaced if given.

    So the replay's ``--device`` is the worker's, and a config can give an inherited
    setting (``RangeSettings.from_time``) a help text of its own.
    """
    found = {f.name: f for f in dataclasses.fields(cls)}
    if name not in found:
        raise ConfigError(f"{cls.__name__} has no setting {name!r}")
    f = found[name]
    meta = f.metadata.get(SETTING)
    if meta is None:
        raise ConfigError(f"{cls.__name__}.{name} is not a setting()")
    if help is not None:
        meta = dataclasses.replace(meta, help=help)
    return dataclasses.field(
        default=f.default,
        default_factory=f.default_factory,
        repr=f.repr,
        kw_only=f.kw_only is True,
        metadata={SETTING: meta},
    )


def _named(meta: Setting, name: str) -> Setting:
    """``meta`` with its flag name resolved ("" -> the field name with dashes)."""
    if meta.flag == "":
        return dataclasses.replace(meta, flag=name.replace("_", "-"))
    return meta


def settings_of(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    """Each field of config ``cls`` declared with :func:`setting`, and its setting."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(SETTING)
        if meta is not None:
            yield f, _named(meta, f.name)


def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (call it only when :func:`has_default`)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class FrozenConfig:
    """Mixin for frozen dataclass configs: strict construction from a mapping, and the
    one check of every :func:`setting`'s ``choices`` (subclasses' ``__post_init__`` call
    ``super().__post_init__()`` first)."""

    def __post_init__(self) -> None:
        for f, meta in settings_of(type(self)):
            if meta.choices is None:
                continue
            value = getattr(self, f.name)
            if value not in meta.choices:
                raise ConfigError(
                    f"{meta.option} must be one of {list(meta.choices)}, not {value!r}"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown setting(s) {unknown}")
        missing = sorted(n for n, f in fields.items() if n not in values and not has_default(f))
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


def check_compression(value: str) -> None:
    """ConfigError unless ``value`` is one of :data:`COMPRESSION_TYPES`."""
    _choice("compression_type", value, COMPRESSION_TYPES)


def compression_setting(what: str) -> Any:
    """``--compression-type`` (worker, produce, replay): how ``what`` is compressed."""
    return setting(
        "none",
        choices=COMPRESSION_TYPES,
        help=f"compression of {what} (batches of records; consumers decode any of these)",
    )


# ------------------------------------------------------------------ the configs


@dataclass(frozen=True, kw_only=True)
class KafkaSecurity:
    """Kafka client and security settings, shared by every command that talks to a cluster.

    The SASL password comes only from ``MMSTREAM_SASL_PASSWORD`` or
    ``--sasl-password-file`` (never a flag) and is kept out of ``repr``.
    """

    #: ``--help`` groups these flags under this title.
    SETTINGS_TITLE: ClassVar[str] = "Kafka client and security"

    kafka_client: str = setting(
        "kafka-python",
        choices=KAFKA_CLIENTS,
        help="Kafka client library: kafka-python, or confluent (librdkafka; pip install "
        "'mmstream[confluent]'); both give the same guarantees",
    )
    security_protocol: str = setting(
        "PLAINTEXT", choices=SECURITY_PROTOCOLS, help="Kafka security protocol"
    )
    sasl_mechanism: str = setting(
        "", help=f"{', '.join(SASL_MECHANISMS[:-1])} or {SASL_MECHANISMS[-1]} (SASL_* protocols)"
    )
    sasl_username: str = setting("", help="SASL user name")
    sasl_password: str = setting(
        "",
        flag=False,
        env=SASL_PASSWORD_ENV,
        repr=False,
        help="the SASL password (environment only, never a flag)",
    )
    sasl_password_file: Path | None = setting(
        None, help=f"file holding the SASL password (or set {SASL_PASSWORD_ENV}; never a flag)"
    )
    ssl_cafile: Path | None = setting(None, help="CA bundle to verify brokers")
    ssl_certfile: Path | None = setting(None, help="client certificate (mTLS)")
    ssl_keyfile: Path | None = setting(None, help="client private key (mTLS)")

    def _check_security(self) -> None:
        # --security-protocol's choices: FrozenConfig.__post_init__ (every setting's).
        if self.security_protocol.startswith("SASL"):
            _choice("sasl_mechanism", self.sasl_mechanism, SASL_MECHANISMS)
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
                    f"a SASL password is required: {SASL_PASSWORD_ENV} or --sasl-password-file"
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

    bootstrap_servers: str = setting(help="Kafka bootstrap servers, host:port[,...]")
    input_topic: str = setting(help="topic of the event parts")
    output_topic: str = setting(help="topic for predictions")
    group_id: str = setting(help="consumer group shared by all worker pods")
    model: Path = setting(help="model directory (model.onnx + manifest.json)")
    dlq_topic: str = setting("", help="dead-letter topic (default: <input-topic>.dlq)")
    max_batch_size: int = setting(32, help="events per inference batch")
    max_batch_delay_ms: int = setting(
        10, help="run a partial batch once its oldest event waited this long"
    )
    inference_queue: int = setting(
        -1,
        help="batches queued or running on the inference thread, which overlaps inference "
        "and publishing with polling and decoding; 0 = infer on the poll thread; -1 = auto: "
        "2 on CUDA, 0 on CPU (where ORT's threads already use the cores)",
    )
    device: str = setting(
        "auto", choices=DEVICES, help="ONNX Runtime device; auto = CUDA when it works, else CPU"
    )
    intra_op_threads: int = setting(0, help="ORT intra-op threads (0 = ORT default)")
    max_part_bytes: int = setting(
        16 * 1024 * 1024, help="larger part records go to the dead-letter topic"
    )
    max_image_pixels: int = setting(
        4096 * 4096, help="images declaring more pixels are refused before decoding"
    )
    commit_interval_ms: int = setting(500, help="how often offsets are committed")
    max_poll_records: int = setting(500, help="records per poll")
    auto_offset_reset: str = setting(
        "earliest",
        choices=("earliest", "latest"),
        help="where a group without committed offsets starts",
    )
    client_id: str = setting("mmstream-worker", help="Kafka client id")
    max_events: int = setting(
        0, help="exit after this many predictions are acknowledged (0 = run until stopped)"
    )
    shutdown_timeout_s: float = setting(
        30.0, help="on SIGTERM, how long to wait for outstanding acknowledgements"
    )
    log_level: str = setting("INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting(
        "text", choices=LOG_FORMATS, help="log lines as text or as one JSON object per line"
    )
    guarantee: str = setting(
        "at-least-once",
        choices=GUARANTEES,
        help="exactly-once: predictions, dead letters and offsets in one transaction",
    )
    transactional_id: str = setting(
        "", help="exactly-once producer id (default: <group-id>-<group-instance-id or client-id>)"
    )
    assembly_timeout_ms: int = setting(
        30_000,
        help="an event still incomplete when its partition's stream time (newest record "
        "timestamp; wall clock once the partition is read to its end) is this far past its "
        "first part is handled by --on-incomplete (0 = until the pending bound evicts it)",
    )
    on_incomplete: str = setting(
        "dlq",
        choices=ON_INCOMPLETE,
        help="timed-out incomplete events: dead-letter their parts, drop them (counted), "
        "or infer with the missing inputs blanked (only if the manifest allows)",
    )
    max_pending_events: int = setting(
        10_000, help="incomplete + unbatched events held; at the limit fetching pauses"
    )
    max_pending_bytes: int = setting(
        512 * 1024 * 1024, help="bytes of held parts; at the limit fetching pauses"
    )
    group_instance_id: str = setting(
        "", help="static group membership id, e.g. the pod name (empty = dynamic)"
    )
    processes: int = setting(
        1,
        help="run this many worker processes in the group (each its own consumer; client, "
        "instance and transactional ids get -<i>); the launcher serves --http-port for all",
    )
    session_timeout_ms: int = setting(
        45_000,
        help="the group drops a member silent this long (a SIGKILLed pod's partitions move "
        "after it; a static member keeps them that long)",
    )
    http_port: int = setting(0, help="serve /metrics, /healthz and /readyz on this port (0 = off)")
    http_host: str = setting("0.0.0.0", help="address the HTTP server binds")
    stall_timeout_s: float = setting(
        60.0,
        help="/healthz fails once a poll loop has not turned for this long (with --processes, "
        "any process's; also the grace for the first turn after start)",
    )
    transaction_wait_s: float = setting(
        20.0,
        help="exactly-once: the longest a transaction's offsets, commit or abort wait for the "
        "transaction coordinator before the transaction is given up (aborted, or the "
        "producer replaced)",
    )
    progress_timeout_s: float = setting(
        120.0,
        help="a worker whose finished work or sent outputs wait this long with no commit or "
        "transaction completing, or that is out of its consumer group this long, exits 1 so "
        "that it is restarted (/healthz fails first); calls it cannot do without are retried "
        "as long during a failover",
    )
    compression_type: str = compression_setting("the predictions and dead letters written")

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.shutdown_timeout_s <= 0:
            raise ConfigError("--shutdown-timeout-s must be > 0")
        if not self.stall_timeout_s > 0:  # also refuses NaN
            raise ConfigError("--stall-timeout-s must be > 0")
        for name in ("progress_timeout_s", "transaction_wait_s"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
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


# ------------------------------------------------------------ argparse from the fields


class AppendAction(argparse.Action):
    """``action="append"`` for a ``tuple[str, ...]`` setting that also copes with a string
    default from its ``MMSTREAM_*`` variable (the config splits comma lists): a flag
    replaces the variable's value (the flag wins) instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        merged = list(items) if isinstance(items, list) else []
        merged.append(values)
        setattr(namespace, self.dest, merged)


def _unoptional(hint: Any) -> Any:
    """``X | None`` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def argparse_kwargs(f: dataclasses.Field[Any], meta: Setting, hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords of one setting: dest, type or action, default or
    required, choices, metavar and help (the default appended when it says something)."""
    kind = _unoptional(hint)
    kwargs: dict[str, Any] = {"dest": meta.dest}
    required = not has_default(f)
    default = None if required else default_of(f)
    if kind is bool:
        if required or default is not False:
            raise ConfigError(f"--{meta.flag}: a bool setting is a store_true flag: default False")
        kwargs["action"] = "store_true"
    elif typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, ...):
        kwargs["action"] = AppendAction
    elif kind in (int, float, Path):
        kwargs["type"] = kind
    elif kind is not str:
        raise ConfigError(f"--{meta.flag}: no flag for a setting of type {hint!r}")
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if meta.choices is not None:
        kwargs["choices"] = meta.choices
    if meta.metavar is not None:
        kwargs["metavar"] = meta.metavar
    text = meta.help.replace("%", "%%")  # argparse %-formats help texts
    if _says_something(default):
        text += " (default: %(default)s)"
    kwargs["help"] = text
    return kwargs


def _says_something(default: Any) -> bool:
    """Whether ``--help`` shows the default: not for None, False, "" or ()."""
    if default is None or isinstance(default, bool):
        return bool(default)
    return not (isinstance(default, str | tuple) and not default)


def _title(cls: type[Any]) -> str:
    title = getattr(cls, "SETTINGS_TITLE", "")
    return title if isinstance(title, str) else ""


def add_config_args(
    parser: argparse.ArgumentParser, cls: type[Any], *, exclude: Sequence[str] = ()
) -> None:
    """Add one argparse argument per :func:`setting` field of config ``cls``.

    The flag is ``--field-name`` (or the setting's own ``flag``); the type comes from
    the annotation (str, int, float, Path, ``X | None``, bool: ``store_true``,
    ``tuple[str, ...]``: repeatable); the default from the field (none: required);
    choices, metavar and help from the setting. Settings a base config declares under
    a ``SETTINGS_TITLE`` (:class:`KafkaSecurity`, ``RangeSettings``) form a help group of
    that title. Non-flag settings read from a variable (``env=``) are recorded on
    ``parser`` for :func:`bind_env`. ``exclude``: field names to leave out.
    """
    hints = typing.get_type_hints(cls)
    env_only: set[str] = set(getattr(parser, _ENV_ONLY_ATTR, ()))
    flags: list[tuple[dataclasses.Field[Any], Setting, str]] = []
    for f, meta in settings_of(cls):
        if f.name in exclude:
            continue
        if meta.flag is None:
            if meta.env:
                env_only.add(meta.env)
            continue
        # The first class (base first) that declares the field says its group.
        owner = next(k for k in reversed(cls.__mro__) if f.name in inspect.get_annotations(k))
        flags.append((f, meta, _title(owner) if owner is not cls else ""))
    groups: dict[str, argparse._ArgumentGroup] = {}
    # The command's own flags first, then each group's (field order otherwise).
    for f, meta, title in sorted(flags, key=lambda entry: entry[2] != ""):
        target: argparse._ActionsContainer = parser
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        target.add_argument(f"--{meta.flag}", **argparse_kwargs(f, meta, hints[f.name]))
    setattr(parser, _ENV_ONLY_ATTR, env_only)


def config_from_args(
    cls: type[C], args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> C:
    """Parsed flags (and each non-flag setting's variable, from ``environ``, default
    ``os.environ``) -> config ``cls``; unknown and missing keys refused."""
    environ = os.environ if environ is None else environ
    by_dest: dict[str, str] = {}
    env_only: dict[str, str] = {}
    for f, meta in settings_of(cls):
        if meta.flag is not None:
            by_dest[meta.dest] = f.name
        elif meta.env:
            env_only[f.name] = meta.env
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key not in NOT_SETTINGS:
            values[by_dest.get(key, key)] = tuple(value) if isinstance(value, list) else value
    for name, var in env_only.items():
        if var in environ:
            values.setdefault(name, environ[var])
    return cls.from_mapping(values)


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

    Appends ``[env: NAME]`` to each help text. Returns the variable names bound, and
    those the parser's non-flag settings read (:func:`add_config_args`).
    """
    names = set(getattr(parser, _ENV_ONLY_ATTR, ()))
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
