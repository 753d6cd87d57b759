"""WorkerMetrics and the probe/metrics HTTP server (no Kafka)."""

from __future__ import annotations

import re
import socket
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

from worker.contract.errors import ConfigError
from worker.ops.http import ProbeServer, beat_health, loop_health
from worker.ops.metrics import METRICS, Metric, WorkerMetrics, markdown_table

# Metric family names as the text exposition's "# TYPE" lines spell them.
METRIC_NAMES = [
    "mmstream_records_consumed_total",
    "mmstream_events_completed_total",
    "mmstream_events_incomplete_total",
    "mmstream_events_evicted_total",
    "mmstream_duplicate_parts_total",
    "mmstream_predictions_total",
    "mmstream_dead_letters_total",
    "mmstream_batch_size",
    "mmstream_inference_seconds",
    "mmstream_end_to_end_seconds",
    "mmstream_pending_events",
    "mmstream_pending_bytes",
    "mmstream_unacked_outputs",
    "mmstream_unacked_output_bytes",
    "mmstream_paused_partitions",
    "mmstream_assigned_partitions",
    "mmstream_uncommitted_records",
    "mmstream_out_of_group_seconds",
    "mmstream_commits_total",
    "mmstream_transactions_total",
    "mmstream_partitions_revoked_total",
    "mmstream_loop_last_iteration_seconds",
    "mmstream_execution_provider",
]


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Flag:
    """A settable probe callback."""

    def __init__(self, ok: bool = False, reason: str = "not yet") -> None:
        self.ok = ok
        self.reason = reason

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.reason


def get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type", ""), e.read()


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics()


@pytest.fixture
def ready() -> Flag:
    return Flag()


@pytest.fixture
def healthy() -> Flag:
    return Flag(ok=True, reason="ok")


@pytest.fixture
def server(metrics: WorkerMetrics, healthy: Flag, ready: Flag) -> Iterator[str]:
    """Base URL of a running ProbeServer on a free port."""
    srv = ProbeServer("127.0.0.1", 0, metrics, healthy, ready)
    port = srv.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


# -- WorkerMetrics ------------------------------------------------------------


def test_each_instance_has_its_own_registry() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()  # would raise "Duplicated timeseries" if shared
    a.predictions.inc(3)
    assert a.value("mmstream_predictions_total") == 3
    assert b.value("mmstream_predictions_total") == 0


def test_explicit_registry_is_used() -> None:
    reg = CollectorRegistry()
    m = WorkerMetrics(reg)
    m.duplicate_parts.inc()
    assert reg.get_sample_value("mmstream_duplicate_parts_total") == 1


def test_fixed_label_sets_start_at_zero(metrics: WorkerMetrics) -> None:
    for action in ("dlq", "drop", "infer"):
        assert metrics.value("mmstream_events_incomplete_total", action=action) == 0
        assert metrics.value("mmstream_events_evicted_total", action=action) == 0
    for result in ("ok", "failed"):
        assert metrics.value("mmstream_commits_total", result=result) == 0
    for result in ("committed", "aborted", "rebuilt"):
        assert metrics.value("mmstream_transactions_total", result=result) == 0
    assert metrics.value("mmstream_dead_letters_total", reason="decode_error") == 0
    assert metrics.value("mmstream_no_such_metric") is None


def test_declarations_are_the_typed_attributes(metrics: WorkerMetrics) -> None:
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    assert typing.get_type_hints(WorkerMetrics) == {m.attr: kinds[m.type] for m in METRICS}
    for m in METRICS:
        assert isinstance(getattr(metrics, m.attr), kinds[m.type]), m.attr
    exported = {family.name for family in metrics.registry.collect()}
    assert exported == {m.name.removesuffix("_total") for m in METRICS}


def test_declaration_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="_total"):
        Metric("x", "mmstream_x", "counter", "help")
    with pytest.raises(ValueError, match="buckets"):
        Metric("x", "mmstream_x", "histogram", "help")
    with pytest.raises(ValueError, match="multiprocess_mode"):
        Metric("x", "mmstream_x_total", "counter", "help", multiprocess_mode="max")
    with pytest.raises(ValueError, match="one label"):
        Metric("x", "mmstream_x_total", "counter", "help", zero=("a",))


def test_labelled_counters_and_histograms(metrics: WorkerMetrics) -> None:
    metrics.records_consumed.labels(modality="image").inc()
    metrics.records_consumed.labels(modality="image").inc()
    metrics.records_consumed.labels(modality="unknown").inc()
    metrics.batch_size.observe(3)
    metrics.inference_seconds.observe(0.002)
    metrics.end_to_end_seconds.observe(0.5)
    assert metrics.value("mmstream_records_consumed_total", modality="image") == 2
    assert metrics.value("mmstream_records_consumed_total", modality="unknown") == 1
    assert metrics.value("mmstream_batch_size_bucket", le="2.0") == 0
    assert metrics.value("mmstream_batch_size_bucket", le="4.0") == 1
    assert metrics.value("mmstream_batch_size_bucket", le="512.0") == 1
    assert metrics.value("mmstream_inference_seconds_bucket", le="0.0001") == 0
    assert metrics.value("mmstream_inference_seconds_bucket", le="1.0") == 1
    assert metrics.value("mmstream_end_to_end_seconds_bucket", le="0.001") == 0
    assert metrics.value("mmstream_end_to_end_seconds_bucket", le="60.0") == 1


def test_set_provider_keeps_one_series(metrics: WorkerMetrics) -> None:
    metrics.set_provider("CUDAExecutionProvider")
    metrics.set_provider("CPUExecutionProvider")
    assert metrics.value("mmstream_execution_provider", provider="CPUExecutionProvider") == 1
    assert metrics.value("mmstream_execution_provider", provider="CUDAExecutionProvider") is None


def test_beat_sets_gauge_and_remembers(metrics: WorkerMetrics) -> None:
    assert metrics.last_beat is None
    metrics.beat(1234.5)
    assert metrics.last_beat == 1234.5
    assert metrics.value("mmstream_loop_last_iteration_seconds") == 1234.5


def test_beat_reports_to_on_beat() -> None:
    seen: list[float] = []
    m = WorkerMetrics(on_beat=seen.append)
    m.beat(10.0)
    m.beat(11.5)
    assert seen == [10.0, 11.5]
    assert m.last_beat == 11.5


# -- loop_health --------------------------------------------------------------


def test_loop_health_starting_then_stalled_without_beat(metrics: WorkerMetrics) -> None:
    clock = FakeClock()
    check = loop_health(metrics, 5.0, clock=clock)
    assert check() == (True, "starting")
    clock.now += 5.0
    assert check() == (True, "starting")
    clock.now += 0.1
    ok, reason = check()
    assert not ok
    assert "not run" in reason


def test_loop_health_follows_beats(metrics: WorkerMetrics) -> None:
    clock = FakeClock()
    check = loop_health(metrics, 2.0, clock=clock)
    metrics.beat(clock.now)
    clock.now += 1.0
    assert check() == (True, "ok")
    clock.now += 1.5
    ok, reason = check()
    assert not ok
    assert "stalled for 2.5s" in reason
    metrics.beat(clock.now)
    assert check() == (True, "ok")


def test_beat_health_is_the_rule_of_loop_health() -> None:
    assert beat_health(None, 100.0, 104.0, 4.0) == (True, "starting")
    assert beat_health(None, 100.0, 104.5, 4.0)[0] is False
    assert beat_health(103.0, 100.0, 107.0, 4.0) == (True, "ok")
    ok, reason = beat_health(103.0, 100.0, 107.25, 4.0)
    assert not ok and reason == "poll loop stalled for 4.2s (limit 4s)"


def test_loop_health_rejects_bad_limit(metrics: WorkerMetrics) -> None:
    with pytest.raises(ConfigError):
        loop_health(metrics, 0)


# -- ProbeServer ----------------------------------------------------------------


def test_metrics_endpoint_lists_every_metric(server: str, metrics: WorkerMetrics) -> None:
    metrics.set_provider("CPUExecutionProvider")
    status, ctype, body = get(server + "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE_LATEST
    text = body.decode()
    for name in METRIC_NAMES:
        assert f"\n# TYPE {name} " in text, name
    assert 'mmstream_execution_provider{provider="CPUExecutionProvider"} 1.0' in text


def test_metrics_endpoint_shows_increments(server: str, metrics: WorkerMetrics) -> None:
    before = get(server + "/metrics")[2].decode()
    assert "mmstream_predictions_total 0.0" in before
    metrics.predictions.inc(7)
    metrics.commits.labels(result="ok").inc()
    metrics.pending_events.set(4)
    after = get(server + "/metrics")[2].decode()
    assert "mmstream_predictions_total 7.0" in after
    assert 'mmstream_commits_total{result="ok"} 1.0' in after
    assert "mmstream_pending_events 4.0" in after


def test_healthz_flips_when_loop_stalls(metrics: WorkerMetrics) -> None:
    clock = FakeClock()
    srv = ProbeServer("127.0.0.1", 0, metrics, loop_health(metrics, 3.0, clock), Flag(True))
    base = f"http://127.0.0.1:{srv.start()}"
    try:
        assert get(base + "/healthz")[::2] == (200, b"ok\n")  # starting
        metrics.beat(clock.now)
        clock.now += 3.0
        assert get(base + "/healthz")[::2] == (200, b"ok\n")
        clock.now += 0.5
        status, ctype, body = get(base + "/healthz")
        assert status == 503
        assert ctype.startswith("text/plain")
        assert b"stalled" in body
        metrics.beat(clock.now)
        assert get(base + "/healthz")[::2] == (200, b"ok\n")
    finally:
        srv.stop()


def test_readyz_503_until_ready(server: str, ready: Flag) -> None:
    assert get(server + "/readyz")[::2] == (503, b"not yet\n")
    ready.reason = "no partitions assigned"
    assert get(server + "/readyz")[::2] == (503, b"no partitions assigned\n")
    ready.ok = True
    assert get(server + "/readyz")[::2] == (200, b"ok\n")


def test_unknown_path_is_404(server: str) -> None:
    assert get(server + "/nope")[0] == 404
    assert get(server + "/")[0] == 404
    assert get(server + "/metrics?name[]=x")[0] == 200  # query strings are ignored


def test_head_requests(server: str) -> None:
    status, ctype, body = get(server + "/metrics", method="HEAD")
    assert (status, ctype, body) == (200, CONTENT_TYPE_LATEST, b"")
    assert get(server + "/readyz", method="HEAD")[::2] == (503, b"")


def test_raising_callback_gives_503_and_server_survives(metrics: WorkerMetrics) -> None:
    calls = 0

    def boom() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("model not loaded")
        return True, "ok"

    srv = ProbeServer("127.0.0.1", 0, metrics, boom, boom)
    base = f"http://127.0.0.1:{srv.start()}"
    try:
        status, _, body = get(base + "/healthz")
        assert status == 503
        assert b"model not loaded" in body
        assert get(base + "/readyz")[0] == 200
        assert get(base + "/metrics")[0] == 200
    finally:
        srv.stop()


def test_stop_closes_the_port(metrics: WorkerMetrics) -> None:
    srv = ProbeServer("127.0.0.1", 0, metrics, Flag(True), Flag(True))
    port = srv.start()
    assert port > 0
    assert srv.start() == port  # idempotent
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    srv.stop()
    srv.stop()  # idempotent
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass


def test_port_in_use_is_a_config_error(metrics: WorkerMetrics) -> None:
    with ProbeServer("127.0.0.1", 0, metrics, Flag(True), Flag(True)) as first:
        taken = first.bound_port
        second = ProbeServer("127.0.0.1", taken, metrics, Flag(True), Flag(True))
        with pytest.raises(ConfigError, match="cannot listen"):
            second.start()


def test_bad_port_is_a_config_error(metrics: WorkerMetrics) -> None:
    with pytest.raises(ConfigError):
        ProbeServer("127.0.0.1", 70_000, metrics, Flag(True), Flag(True))


def test_request_logs_go_to_logger_not_stderr(
    server: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG", logger="worker.ops.http"):
        get(server + "/healthz")
    assert capsys.readouterr().err == ""
    assert any("GET /healthz" in r.getMessage() for r in caplog.records)


# -- docs/operations.md's metrics table ------------------------------------------

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
_METRIC_CELL = re.compile(r"`(\w+)(?:\{(\w+(?:,\w+)*)\})?`")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables in ``text``: rows of stripped cells (header and rule included)."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous = line
    return tables


def metric_rows(table: list[list[str]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, type, labels) of each row below the header, from the first two cells."""
    rows = []
    for cells in table[2:]:
        match = _METRIC_CELL.fullmatch(cells[0])
        assert match, f"not one metric as `name{{label,...}}`: {cells[0]}"
        labels = tuple(match.group(2).split(",")) if match.group(2) else ()
        rows.append((match.group(1), cells[1], labels))
    return rows


def declared() -> list[tuple[str, str, tuple[str, ...]]]:
    return sorted((m.name, m.type, m.labels) for m in METRICS)


def test_markdown_table_prints_the_declarations() -> None:
    (table,) = markdown_tables(markdown_table())
    assert metric_rows(table) == [(m.name, m.type, m.labels) for m in METRICS]


def test_operations_guide_has_one_table_of_exactly_the_declared_metrics() -> None:
    tables = [
        table
        for table in markdown_tables(OPERATIONS.read_text())
        if any(cells[0].startswith("`mmstream_") for cells in table)
    ]
    assert len(tables) == 1, "docs/operations.md: the metrics are listed in one table"
    (table,) = tables
    (printed,) = markdown_tables(markdown_table())
    assert table[0] == printed[0]
    # Sorted lists, not sets, so that a metric listed twice fails too.
    assert sorted(metric_rows(table)) == declared()
