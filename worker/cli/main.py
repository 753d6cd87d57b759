"""``mmstream``: the one command line, with subcommands.

    mmstream train-reference   train the reference "digits seen, read and heard" model  [export]
    mmstream export            Keras model -> model.onnx + manifest.json, parity-checked [export]
    mmstream worker            the streaming worker
    mmstream produce           sample / load traffic for the input topic
    mmstream demo              produce, run the worker, print a summary
    mmstream bench             raw ORT, raw consume, worker end to end and under load

Every flag can also come from an ``MMSTREAM_*`` variable (named in ``--help``).
Errors print one line, ``mmstream: error: ...``, and exit 2 (bad input or
config) or 1 (a runtime failure such as an unreachable broker).

This module imports no TensorFlow: the ``[export]`` subcommands load it only
when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from worker import __version__
from worker.backfill.ranges import add_range_args, range_settings
from worker.config import (
    SASL_PASSWORD_ENV,
    WorkerConfig,
    add_compression_arg,
    add_security_args,
    bind_env,
    check_unknown_env,
    env_snapshot,
)
from worker.contract.errors import (
    EXIT_INTERRUPTED,
    STORAGE_ERRNOS,
    MMStreamError,
    one_line,
    os_error,
)
from worker.ops.logs import configure_logging

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port[,...]"
    )
    p.add_argument("--input-topic", required=True, help="topic of the event parts")
    p.add_argument("--output-topic", required=True, help="topic for predictions")
    p.add_argument("--dlq-topic", default="", help="dead-letter topic (default: <input-topic>.dlq)")
    p.add_argument("--group-id", required=True, help="consumer group shared by all worker pods")
    p.add_argument(
        "--model", required=True, type=Path, help="model directory (model.onnx + manifest.json)"
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="events per inference batch")
    p.add_argument(
        "--max-batch-delay-ms",
        type=int,
        default=10,
        help="run a partial batch once its oldest event waited this long",
    )
    p.add_argument(
        "--inference-queue",
        type=int,
        default=-1,
        help="batches queued or running on the inference thread, which overlaps inference "
        "and publishing with polling and decoding; 0 = infer on the poll thread; -1 = auto: "
        "2 on CUDA, 0 on CPU (where ORT's threads already use the cores)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="ONNX Runtime device; auto = CUDA when it works, else CPU",
    )
    p.add_argument(
        "--intra-op-threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)"
    )
    p.add_argument(
        "--max-part-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="larger part records go to the dead-letter topic",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="images declaring more pixels are refused before decoding",
    )
    p.add_argument(
        "--commit-interval-ms", type=int, default=500, help="how often offsets are committed"
    )
    p.add_argument("--max-poll-records", type=int, default=500, help="records per poll")
    p.add_argument(
        "--auto-offset-reset",
        choices=("earliest", "latest"),
        default="earliest",
        help="where a group without committed offsets starts",
    )
    p.add_argument("--client-id", default="mmstream-worker", help="Kafka client id")
    p.add_argument(
        "--max-events",
        type=int,
        default=0,
        help="exit after this many predictions are acknowledged (0 = run until stopped)",
    )
    p.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long to wait for outstanding acknowledgements",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as one JSON object per line",
    )
    p.add_argument(
        "--guarantee",
        choices=("at-least-once", "exactly-once"),
        default="at-least-once",
        help="exactly-once: predictions, dead letters and offsets in one transaction",
    )
    p.add_argument(
        "--transactional-id",
        default="",
        help="exactly-once producer id (default: <group-id>-<group-instance-id or client-id>)",
    )
    p.add_argument(
        "--assembly-timeout-ms",
        type=int,
        default=30_000,
        help="an event still incomplete this long after its first part is handled "
        "by --on-incomplete (0 = wait forever)",
    )
    p.add_argument(
        "--on-incomplete",
        choices=("dlq", "drop", "infer"),
        default="dlq",
        help="timed-out incomplete events: dead-letter their parts, drop them (counted), "
        "or infer with the missing inputs blanked (only if the manifest allows)",
    )
    p.add_argument(
        "--max-pending-events",
        type=int,
        default=10_000,
        help="incomplete + unbatched events held; at the limit fetching pauses",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=int,
        default=512 * 1024 * 1024,
        help="bytes of held parts; at the limit fetching pauses",
    )
    p.add_argument(
        "--group-instance-id",
        default="",
        help="static group membership id, e.g. the pod name (empty = dynamic)",
    )
    p.add_argument(
        "--session-timeout-ms",
        type=int,
        default=45_000,
        help="the group drops a member silent this long (a SIGKILLed pod's partitions move "
        "after it; a static member keeps them that long)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run this many worker processes in the group (each its own consumer; client, "
        "instance and transactional ids get -<i>); the launcher serves --http-port for all",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="serve /metrics, /healthz and /readyz on this port (0 = off)",
    )
    p.add_argument("--http-host", default="0.0.0.0", help="address the HTTP server binds")
    p.add_argument(
        "--stall-timeout-s",
        type=float,
        default=60.0,
        help="/healthz fails once a poll loop has not turned for this long (with --processes, "
        "any process's; also the grace for the first turn after start)",
    )
    add_compression_arg(p, "the predictions and dead letters written")
    add_security_args(p)


def _add_produce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers")
    p.add_argument("--topic", required=True, help="input topic to write parts to")
    p.add_argument("--count", type=int, default=300, help="events to produce")
    p.add_argument("--rate", type=float, default=0.0, help="events/s (0 = as fast as possible)")
    p.add_argument(
        "--content",
        choices=("raw", "npy"),
        default="raw",
        help="raw media (PNG, text, WAV) or the model's tensors as .npy",
    )
    p.add_argument("--model", type=Path, default=None, help="model directory (needed for npy)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same events)")
    p.add_argument(
        "--corrupt-p",
        type=float,
        default=0.0,
        help="probability that each modality of an event is replaced by noise",
    )
    p.add_argument(
        "--missing-fraction",
        type=float,
        default=0.0,
        help="share of events (0..1) that never send one of their parts; the events and the "
        "part are chosen by --seed (the worker sees them incomplete)",
    )
    p.add_argument(
        "--poison-fraction",
        type=float,
        default=0.0,
        help="share of events (0..1; not the missing ones: the two fractions add up to <= 1) "
        "that send one bad record in place of a good part, cycling over: no key "
        "(missing_key), unknown mm-modality (unknown_modality), unsupported content-type "
        "(unsupported_content_type), undecodable bytes (decode_error), wrong npy shape "
        "(shape_mismatch); the bad record is dead-lettered with that reason and the event "
        "also ends incomplete",
    )
    p.add_argument(
        "--shuffle-window",
        type=int,
        default=16,
        help="parts are shuffled within windows of this many events",
    )
    p.add_argument(
        "--labels-out",
        type=Path,
        default=None,
        help="write one JSON line per event here: event_id, label, and what was done to it "
        '("missing": PART or "poison": REASON, "poison_part": PART)',
    )
    p.add_argument("--key-prefix", default="", help="event id prefix (default ev-<seed>-)")
    p.add_argument("--client-id", default="mmstream-produce", help="Kafka client id")
    add_compression_arg(p, "the parts written")


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument(
        "--model", type=Path, default=Path(".cache/reference-onnx"), help="model directory"
    )
    p.add_argument("--count", type=int, default=400, help="events to produce")
    p.add_argument("--rate", type=float, default=300.0, help="events/s produced (0 = burst)")
    p.add_argument("--content", choices=("raw", "npy"), default="raw", help="part encoding")
    p.add_argument("--partitions", type=int, default=3, help="partitions of the demo topics")
    p.add_argument("--seed", type=int, default=7, help="random seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ORT device")
    p.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument(
        "--out", type=Path, default=Path(".cache/bench"), help="writes bench.{json,md,png} here"
    )
    p.add_argument("--events", type=int, default=3000, help="events per worker run")
    p.add_argument(
        "--batch-sizes",
        default="1,8,32,128",
        help="raw-ORT batch sizes, comma-separated (--max-batch-size is always added)",
    )
    p.add_argument("--content", choices=("npy", "raw"), default="npy", help="part encoding")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ORT device")
    p.add_argument("--partitions", type=int, default=3, help="partitions of the bench topics")
    p.add_argument(
        "--open-loop-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a share of the measured end-to-end events/s",
    )
    p.add_argument(
        "--seconds-per-ort-point",
        type=float,
        default=2.0,
        help="time spent per raw-ORT batch size",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="the worker's max batch size")
    p.add_argument(
        "--max-batch-delay-ms", type=int, default=10, help="the worker's max batch delay"
    )
    p.add_argument(
        "--inference-queue",
        type=int,
        default=-1,
        help="the worker's --inference-queue (-1 = auto, 0 = infer on the poll thread)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes in the end-to-end and open-loop runs (mmstream worker "
        "--processes N; at most --partitions)",
    )
    p.add_argument("--seed", type=int, default=11, help="random seed of the produced events")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up a run after this long")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run the pre-produced run under cProfile (writes profile.txt)",
    )
    p.add_argument(
        "--keep-topics", action="store_true", help="keep the bench topics (default: deleted)"
    )


# ------------------------------------------------------------------ handlers


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.ops.serve import run_worker

    settings = _settings(args)
    settings["sasl_password"] = os.environ.get(SASL_PASSWORD_ENV, "")
    config = WorkerConfig.from_mapping(settings)
    configure_logging(config.log_level, config.log_format)
    if config.processes > 1:
        from worker.ops.processes import run_processes

        return run_processes(config)
    stop = _stop_on_signals("stopping (draining in-flight work)")
    stats = run_worker(config, stop)
    print(
        json.dumps(
            {
                "predicted": stats.predicted,
                "dead_lettered": stats.dead_lettered,
                "consumed": stats.consumed,
                "provider": stats.provider,
            }
        )
    )
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from worker.tools.produce import ProduceConfig, produce

    result = produce(ProduceConfig.from_mapping(_settings(args)))
    print(json.dumps(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.tools.demo import DemoConfig, format_summary, run_demo

    config = DemoConfig.from_mapping(_settings(args))
    with tempfile.TemporaryDirectory(prefix="mmstream-demo-") as tmp:
        summary = run_demo(config, Path(tmp))
    print(format_summary(summary))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from worker.tools.bench import BenchConfig, format_summary, run_bench

    config = BenchConfig.from_mapping(_settings(args))
    report = run_bench(config)
    print(format_summary(report))
    return 0


def _export_handler(name: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from export import commands

        main: Handler = getattr(commands, name)
        return main(args)

    return handler


def _add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers")
    p.add_argument("--source-topic", default="", help="topic of the parts to re-score")
    p.add_argument("--model", type=Path, default=None, help="model directory to score with")
    add_range_args(
        p,
        "start of the window, ISO-8601 (e.g. 2026-11-28T00:00:00Z; no zone = UTC); "
        "events whose newest part is at or after it",
        "end of the window, ISO-8601, exclusive",
    )
    p.add_argument(
        "--output-topic", default="", help="where predictions go (default: <source>.backfill)"
    )
    p.add_argument("--dlq-topic", default="", help="dead letters (default: <output-topic>.dlq)")
    p.add_argument(
        "--backfill-id",
        default="",
        help="checkpoint name (group mmstream-backfill-<id>); default: derived from the "
        "source, range, output and model, so re-running the same command resumes",
    )
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint and start over")
    p.add_argument(
        "--rate", type=float, default=0.0, help="at most this many events/s (0 = no limit)"
    )
    p.add_argument(
        "--edge-margin-ms",
        type=int,
        default=60_000,
        help="read this much beyond both window edges, so events straddling an edge are whole",
    )
    p.add_argument(
        "--on-incomplete",
        choices=("dlq", "drop", "infer"),
        default="dlq",
        help="events of the window still missing parts at the range's end",
    )
    p.add_argument(
        "--guarantee",
        choices=("at-least-once", "exactly-once"),
        default="at-least-once",
        help="exactly-once: outputs and checkpoints in transactions (no repeats after a crash)",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="events per inference batch")
    p.add_argument("--max-batch-delay-ms", type=int, default=10, help="partial batch delay")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the ranges (per partition: offsets, records, checkpoint); change nothing",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        default="auto",
        help="a progress bar on a terminal, else a log line every 10 s",
    )
    p.add_argument(
        "--source-file",
        type=Path,
        default=None,
        help="an archive (mmstream archive, JSON Lines): restored to --to-topic, or, with "
        "--model and --output-topic, scored whole (through a staging topic)",
    )
    p.add_argument(
        "--to-topic", default="", help="with --source-file: restore the archive to this topic"
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines")
    add_compression_arg(p, "what replay writes (predictions, dead letters, a restored archive)")
    add_security_args(p)


def _cmd_replay(args: argparse.Namespace) -> int:
    from worker.backfill.replay import ReplayConfig, run_replay

    settings = range_settings(_settings(args))
    settings["sasl_password"] = os.environ.get(SASL_PASSWORD_ENV, "")
    config = ReplayConfig.from_mapping(settings)
    configure_logging(config.log_level, config.log_format)
    stop = _stop_on_signals("stopping the replay at a checkpoint")
    summary = run_replay(config, stop)
    print(json.dumps(summary, sort_keys=True))
    if stop.is_set():
        print(
            "mmstream: replay stopped before the end; run the same command to continue",
            file=sys.stderr,
        )
        return 1
    return 0


def _stop_on_signals(what: str) -> threading.Event:
    """An event SIGTERM and SIGINT set (logged with ``what``): the loop drains and stops."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _settings(args: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(args).items() if k not in ("command", "handler")}


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    from export.commands import add_export_args, add_train_reference_args
    from worker.backfill.archive import add_archive_args, cmd_archive

    environ = env_snapshot() if environ is None else environ
    parser = _Parser(
        prog="mmstream",
        description="Streaming multimodal inference: Kafka parts in, ONNX Runtime predictions out.",
        epilog="Every flag can also be set by the MMSTREAM_* variable named in its help.",
    )
    parser.add_argument("--version", action="version", version=f"mmstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = [
        (
            "train-reference",
            "train the reference model (needs the [export] extra)",
            add_train_reference_args,
            _export_handler("train_reference_main"),
        ),
        (
            "export",
            "convert a Keras model to model.onnx + manifest.json (needs [export])",
            add_export_args,
            _export_handler("export_main"),
        ),
        ("worker", "run the streaming worker", _add_worker_args, _cmd_worker),
        ("produce", "produce reference events to the input topic", _add_produce_args, _cmd_produce),
        (
            "archive",
            "write a topic's time or offset range to a JSON Lines archive (restore: replay "
            "--source-file)",
            add_archive_args,
            cmd_archive,
        ),
        (
            "replay",
            "re-score a topic's time or offset range (backfill), resumable; or restore an archive",
            _add_replay_args,
            _cmd_replay,
        ),
        ("demo", "produce events, run the worker, print a summary", _add_demo_args, _cmd_demo),
        (
            "bench",
            "benchmark: raw ORT, raw consume, the worker end to end and under load",
            _add_bench_args,
            _cmd_bench,
        ),
    ]
    known: set[str] = set()
    for name, help_text, add_args, handler in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
        known |= bind_env(p, environ)
    parser.set_defaults(known_env=known | {SASL_PASSWORD_ENV})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("INFO", "text")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_unknown_env(args.known_env, env_snapshot())
        del args.known_env
        handler: Handler = args.handler
        return handler(args)
    except MMStreamError as exc:  # the error says its exit code (worker.contract.errors)
        print(f"mmstream: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk wherever a command writes: one line, exit 1
        if exc.errno not in STORAGE_ERRNOS:
            raise
        err = os_error(repr(exc.filename) if exc.filename else "file system", exc)
        print(f"mmstream: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
