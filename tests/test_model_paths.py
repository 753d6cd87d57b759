"""The two ways ModelRunner runs a batch: plain ``session.run`` and ORT IO binding.

The IO-binding path is the CUDA default; here it runs on the CPU (tensors bound on
the CPU device) with the tiny model and must give what the plain path gives.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import worker.inference.model
from worker.contract.errors import ConfigError, InferenceError, ModelError
from worker.contract.manifest import MODEL_FILE, Manifest, load_manifest
from worker.contract.records import Event, Part
from worker.contract.transforms import WordsTransform
from worker.inference.model import (
    DEFAULT_BATCH_BUCKETS,
    ModelRunner,
    SessionInfo,
    buckets_up_to,
    create_session,
    cuda_provider_options,
    host_buffer,
)

from factories import small_manifest, source

TOL = 1e-6


def random_rows(manifest: Manifest, n: int, rng: np.random.Generator) -> dict[str, NDArray[Any]]:
    """``n`` random but valid examples per input (token ids within the vocabulary)."""
    rows: dict[str, NDArray[Any]] = {}
    for i in manifest.inputs:
        part = manifest.part_of(i.name)
        if part is not None and isinstance(part.transform, WordsTransform):
            vocab = len(part.transform.vocabulary)
            rows[i.name] = rng.integers(0, vocab, size=(n, *i.shape)).astype(i.dtype)
        else:
            rows[i.name] = rng.random((n, *i.shape), dtype=np.float32).astype(i.dtype)
    return rows


@pytest.fixture(scope="module")
def runners(tiny_model_dir: Path) -> tuple[ModelRunner, ModelRunner]:
    """(plain, bound) runners sharing one CPU session of the tiny model."""
    manifest = load_manifest(tiny_model_dir, verify=True)
    session, info = create_session(tiny_model_dir / MODEL_FILE, "cpu")
    plain = ModelRunner(manifest, session, info)
    bound = ModelRunner(manifest, session, info, io_binding=True, batch_buckets=(1, 2, 4, 8))
    return plain, bound


def assert_same(a: list[NDArray[Any]], b: list[NDArray[Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=0, atol=TOL)


def test_defaults_bind_only_on_cuda(runners: tuple[ModelRunner, ModelRunner]) -> None:
    plain, bound = runners
    assert plain.info.provider == "CPUExecutionProvider"
    assert not plain.io_binding and bound.io_binding and bound.binding_device == "cpu"
    assert not bound.pin_host  # page-locking is for CUDA only


@pytest.mark.parametrize("n", [1, 3, 4, 6, 8, 11])
def test_bound_run_equals_plain_run(runners: tuple[ModelRunner, ModelRunner], n: int) -> None:
    """Exact buckets (1, 4, 8), padded batches (3 -> 4, 6 -> 8) and one above them all (11)."""
    plain, bound = runners
    feed = random_rows(plain.manifest, n, np.random.default_rng(n))
    want = plain.run(feed)
    got = bound.run(feed)
    assert got[0].shape[0] == n
    assert_same(got, want)


def test_a_bucket_is_reused_with_new_data(runners: tuple[ModelRunner, ModelRunner]) -> None:
    """Same bucket, different batches: stale padding rows and reused outputs change nothing."""
    plain, bound = runners
    rng = np.random.default_rng(7)
    for n in (8, 5, 7, 5):  # all in bucket 8; later batches leave earlier rows behind
        feed = random_rows(plain.manifest, n, rng)
        assert_same(bound.run(feed), plain.run(feed))
    assert bound.bucket_for(5) == 8 and bound.bucket_for(9) == 9
    assert bound._buckets[8].runs >= 4 and not bound.pinned


def test_bound_run_casts_and_copies_non_contiguous_inputs(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    plain, bound = runners
    feed = random_rows(plain.manifest, 8, np.random.default_rng(3))
    odd = {k: np.asfortranarray(v) if v.dtype == np.float32 else v for k, v in feed.items()}
    odd = {k: v.astype(np.float64) if k == "audio" else v for k, v in odd.items()}
    assert_same(bound.run(odd), plain.run(feed))


def test_bound_predict_equals_plain_predict(runners: tuple[ModelRunner, ModelRunner]) -> None:
    """predict() stacks straight into the bound buffers; an incomplete event is blanked."""
    plain, bound = runners
    rows = random_rows(plain.manifest, 5, np.random.default_rng(5))
    events = [
        Event(
            f"e{k}",
            0,
            {name: Part(f"e{k}", name, {name: arr[k]}, source(k)) for name, arr in rows.items()},
            first_seen_ms=1,
            completed_ms=2,
        )
        for k in range(5)
    ]
    partial = events[4]
    events[4] = Event("e4", 0, {"image": partial.parts["image"]}, 1, 2, missing=("audio", "text"))
    want = plain.predict(events, clock=lambda: 7)
    got = bound.predict(events, clock=lambda: 7)
    assert [p.event_id for p in got] == [p.event_id for p in want]
    for g, w in zip(got, want, strict=True):
        assert g.label == w.label and g.missing == w.missing and g.timing == w.timing
        assert g.score == pytest.approx(w.score, abs=TOL)
        for name in w.outputs:
            np.testing.assert_allclose(g.outputs[name], w.outputs[name], rtol=0, atol=TOL)


def test_bound_run_refuses_bad_feeds(runners: tuple[ModelRunner, ModelRunner]) -> None:
    plain, bound = runners
    feed = random_rows(plain.manifest, 2, np.random.default_rng(1))
    with pytest.raises(InferenceError, match="feed has inputs"):
        bound.run({k: v for k, v in feed.items() if k != "text"})
    with pytest.raises(InferenceError, match="shape"):
        bound.run({**feed, "audio": feed["audio"][:, :3]})
    with pytest.raises(InferenceError, match="disagree"):
        bound.run({**feed, "text": feed["text"][:1]})
    with pytest.raises(InferenceError, match="empty"):
        bound.run({k: v[:0] for k, v in feed.items()})


class PlainOnlySession:
    def run(self, output_names: Any, input_feed: dict[str, Any]) -> list[Any]:
        return []


def test_io_binding_needs_a_real_session_and_is_the_cuda_default() -> None:
    cpu = ModelRunner(small_manifest(), PlainOnlySession(), SessionInfo("CPUExecutionProvider", ()))
    assert not cpu.io_binding
    with pytest.raises(ConfigError, match="io_binding"):  # on CUDA, binding is the default
        ModelRunner(small_manifest(), PlainOnlySession(), SessionInfo("CUDAExecutionProvider", ()))
    cuda = ModelRunner(
        small_manifest(),
        PlainOnlySession(),
        SessionInfo("CUDAExecutionProvider", ()),
        io_binding=False,
    )
    assert not cuda.io_binding and cuda.binding_device == "cuda"
    with pytest.raises(ConfigError, match="positive"):
        ModelRunner(small_manifest(), PlainOnlySession(), SessionInfo("CPU", ()), batch_buckets=[0])


def test_buckets() -> None:
    assert buckets_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_up_to(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets_up_to(1) == (1,)
    assert DEFAULT_BATCH_BUCKETS[-1] == 1024
    with pytest.raises(ConfigError):
        buckets_up_to(0)
    runner = ModelRunner(small_manifest(), PlainOnlySession(), SessionInfo("CPU", ()))
    assert [runner.bucket_for(n) for n in (1, 3, 17, 1024, 1500)] == [1, 4, 32, 1024, 1500]


def test_host_buffer_is_zeroed_and_page_aligned() -> None:
    arr, pinned = host_buffer((3, 5, 7), "int32", None)
    assert not pinned and arr.shape == (3, 5, 7) and arr.dtype == np.int32
    assert arr.flags.c_contiguous and arr.ctypes.data % 4096 == 0 and not arr.any()


def test_cuda_provider_options() -> None:
    assert cuda_provider_options() == {
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1",
    }
    assert cuda_provider_options("EXHAUSTIVE")["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda_provider_options(tf32=False)["use_tf32"] == "0"  # strict parity
    with pytest.raises(ConfigError):
        cuda_provider_options("FASTEST")


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister / cudaGetLastError that only record (no CUDA
    here); a failed register leaves its error as the last one, as the CUDA runtime does."""

    def __init__(self, rc: int = 0) -> None:
        self.rc = rc
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.last_error = 0

    def cudaGetLastError(self) -> int:
        err, self.last_error = self.last_error, 0
        return err

    def cudaHostRegister(self, ptr: ctypes.c_void_p, size: int, flags: int) -> int:
        assert ptr.value is not None and flags == 0
        if self.rc == 0:
            self.registered[ptr.value] = size
        self.last_error = self.rc
        return self.rc

    def cudaHostUnregister(self, ptr: ctypes.c_void_p) -> int:
        assert ptr.value is not None
        self.unregistered.append(ptr.value)
        return 0


def test_a_pinned_host_buffer_is_whole_pages_and_unregistered_when_freed() -> None:
    cudart = FakeCudart()
    arr, pinned = host_buffer((5, 48, 40), "float32", cudart)  # type: ignore[arg-type]
    ptr = arr.ctypes.data
    assert pinned and list(cudart.registered) == [ptr] and ptr % 4096 == 0
    assert cudart.registered[ptr] % 4096 == 0 and cudart.registered[ptr] >= arr.nbytes
    del arr
    gc.collect()
    assert cudart.unregistered == [ptr]
    failing = FakeCudart(rc=2)
    arr, pinned = host_buffer((3,), "int32", failing)  # type: ignore[arg-type]
    assert not pinned and not failing.registered and arr.shape == (3,)
    # the failure's error was read, so ORT's next kernel launch does not find it stale
    assert failing.last_error == 0


def test_bound_run_through_pinned_buffers_equals_plain_run(
    runners: tuple[ModelRunner, ModelRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With page-locked buffers every batch is staged through them (CUDA's way); same outputs."""
    plain, _ = runners
    cudart = FakeCudart()
    monkeypatch.setattr(worker.inference.model, "_loaded_cudart", lambda: cudart)
    pinned = ModelRunner(plain.manifest, plain.session, plain.info, io_binding=True, pin_host=True)
    rng = np.random.default_rng(11)
    for n in (4, 3, 4):
        feed = random_rows(plain.manifest, n, rng)
        assert_same(pinned.run(feed), plain.run(feed))
    assert pinned.pinned and len(cudart.registered) == len(plain.manifest.inputs)
    del pinned
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(cudart.registered)


class _Spy:
    """Records the calls named in ``watch`` into ``log`` and hands everything to ``inner``."""

    def __init__(self, inner: Any, log: list[tuple[str, str]], watch: str, label: str) -> None:
        self._inner, self._log, self._watch, self._label = inner, log, watch, label

    def __getattr__(self, attr: str) -> Any:
        found = getattr(self._inner, attr)
        if attr != self._watch:
            return found

        def call(*args: Any) -> Any:
            unwrapped = [a._inner if isinstance(a, _Spy) else a for a in args]
            self._log.append((attr, self._label if self._label else str(args[0])))
            return found(*unwrapped)

        return call


def test_each_bound_run_binds_every_input_again_after_updating_it(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    """A tensor ORT copied to another device for a node placed there is stale once the
    bound one is updated in place: every run binds each input again after its update."""
    plain, bound = runners
    rng = np.random.default_rng(5)
    bound.run(random_rows(plain.manifest, 4, rng))  # makes bucket 4
    bucket = bound._buckets[4]
    calls: list[tuple[str, str]] = []
    bucket.binding = _Spy(bucket.binding, calls, "bind_ortvalue_input", "")
    bucket.device = {n: _Spy(v, calls, "update_inplace", n) for n, v in bucket.device.items()}
    for _ in range(2):
        feed = random_rows(plain.manifest, 4, rng)
        assert_same(bound.run(feed), plain.run(feed))
    names = [i.name for i in plain.manifest.inputs]
    one_run = [call for n in names for call in (("update_inplace", n), ("bind_ortvalue_input", n))]
    assert calls == one_run * 2


# ORT warns (a UserWarning) that the CUDA provider it was asked for is not in this build.
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_device_cuda_without_the_driver_is_one_line_naming_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where onnxruntime offers CUDA but the session comes up on the CPU (no driver: a
    GPU image on a node without one), --device cuda fails with one line naming
    libcuda.so.1; this machine has no driver, the offer is faked."""
    import onnxruntime

    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: offered)
    with pytest.raises(ModelError) as err:
        create_session(tiny_model_dir / MODEL_FILE, "cuda")
    message = str(err.value)
    assert "\n" not in message and "CUDA did not initialise" in message
    assert "libcuda.so.1 cannot be loaded" in message and "--device auto" in message
    _, info = create_session(tiny_model_dir / MODEL_FILE, "auto")  # falls back, and says so
    assert info.provider == "CPUExecutionProvider"
    # with the driver there, the message says so and points at the provider's log
    monkeypatch.setattr(worker.inference.model.ctypes, "CDLL", lambda name: object())
    with pytest.raises(ModelError, match=r"libcuda\.so\.1 loads, but the CUDA provider"):
        create_session(tiny_model_dir / MODEL_FILE, "cuda")
