"""The settings of ``mmstream bench`` (its flags and ``MMSTREAM_*`` variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.config import CONTENTS, FrozenConfig, WorkerConfig, setting, setting_from
from worker.contract.errors import ConfigError
from worker.tools.produce import ProduceConfig


@dataclass(frozen=True)
class BenchConfig(FrozenConfig):
    """Settings of ``mmstream bench``; see ``mmstream bench --help``."""

    bootstrap_servers: str = setting(help="Kafka bootstrap servers")
    model: Path = setting(help="model directory")
    out: Path = setting(Path(".cache/bench"), help="writes bench.{json,md,png} here")
    events: int = setting(3000, help="events per worker run")
    batch_sizes: str = setting(
        "1,8,32,128",
        help="raw-ORT batch sizes, comma-separated (--max-batch-size is always added)",
    )
    content: str = setting("npy", choices=CONTENTS, help="part encoding")
    media: str = setting_from(
        ProduceConfig,
        "media",
        help="what the parts hold: the reference task's digits, or random media made by each "
        "part's transform (any model)",
    )
    image_type: str = setting_from(
        ProduceConfig, "image_type", help="how raw images are encoded (--content raw)"
    )
    audio_type: str = setting_from(
        ProduceConfig, "audio_type", help="how raw audio is encoded (--content raw)"
    )
    device: str = setting_from(WorkerConfig, "device", help="ORT device")
    partitions: int = setting(3, help="partitions of the bench topics")
    open_loop_fraction: float = setting(
        0.5, help="open-loop rate as a share of the measured end-to-end events/s"
    )
    seconds_per_ort_point: float = setting(2.0, help="time spent per raw-ORT batch size")
    max_batch_size: int = setting_from(
        WorkerConfig, "max_batch_size", help="the worker's max batch size"
    )
    max_batch_delay_ms: int = setting_from(
        WorkerConfig, "max_batch_delay_ms", help="the worker's max batch delay"
    )
    inference_queue: int = setting_from(
        WorkerConfig,
        "inference_queue",
        help="the worker's --inference-queue (-1 = auto, 0 = infer on the poll thread)",
    )
    processes: int = setting_from(
        WorkerConfig,
        "processes",
        help="worker processes in the end-to-end and open-loop runs (mmstream worker "
        "--processes N; at most --partitions)",
    )
    kafka_client: str = setting_from(
        WorkerConfig, "kafka_client", help="the worker's Kafka client (raw consume runs both)"
    )
    seed: int = setting(11, help="random seed of the produced events")
    timeout_s: float = setting(600.0, help="give up a run after this long")
    profile: bool = setting(
        False, help="also run the pre-produced run under cProfile (writes profile.txt)"
    )
    keep_topics: bool = setting(False, help="keep the bench topics (default: deleted)")

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "out", Path(self.out))
        if self.events <= 0 or self.partitions <= 0 or self.max_batch_size <= 0:
            raise ConfigError("--events, --partitions and --max-batch-size must be > 0")
        if not 0 < self.processes <= self.partitions:
            raise ConfigError("--processes must be within 1..--partitions (one partition each)")
        if self.inference_queue < -1:
            raise ConfigError("--inference-queue must be -1 (auto) or >= 0")
        if self.max_batch_delay_ms < 0:
            raise ConfigError("--max-batch-delay-ms must be >= 0")
        if not 0.0 < self.open_loop_fraction <= 1.0:
            raise ConfigError("--open-loop-fraction must be within (0, 1]")
        if self.seconds_per_ort_point <= 0 or self.timeout_s <= 0:
            raise ConfigError("--seconds-per-ort-point and --timeout-s must be > 0")
        if self.media == "files":
            raise ConfigError("--media: the bench makes its events (reference or random)")
        self.batch_size_list()  # validates

    def batch_size_list(self) -> list[int]:
        """The raw-ORT batch sizes, sorted, always including ``max_batch_size``."""
        try:
            sizes = {int(s) for s in self.batch_sizes.split(",") if s.strip()}
        except ValueError as exc:
            raise ConfigError(
                f"--batch-sizes must be a comma list of integers: {self.batch_sizes!r}"
            ) from exc
        if not sizes or min(sizes) <= 0:
            raise ConfigError(f"--batch-sizes must be positive integers: {self.batch_sizes!r}")
        return sorted(sizes | {self.max_batch_size})
