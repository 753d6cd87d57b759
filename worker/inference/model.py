"""Infer stage: a model directory -> an ONNX Runtime session that scores batches.

The manifest's sha256 is checked before the session is created. The provider
that really runs is read from ``session.get_providers()`` after creation:
``get_available_providers()`` lists what was compiled in (onnxruntime-gpu lists
CUDA on machines without a GPU and then silently runs on CPU).

Two ways to run a batch:

* plain ``session.run(feed)`` (the CPU default): ORT takes the numpy arrays,
  copies them where they are needed and returns new numpy outputs;
* IO binding (the CUDA default, :class:`ModelRunner` ``io_binding``): per
  *bucket* (the batch size rounded up to the next of ``batch_buckets``, powers of
  two by default, so the GPU sees a handful of shapes, each one tuned once) the
  runner keeps, allocated once, a host buffer per input (page-locked with
  ``cudaHostRegister`` where the CUDA runtime ORT loaded can be found) and a
  device tensor per input, bound to an ``IOBinding`` whose outputs are bound to
  the CPU. A batch is stacked straight into the host buffers (padding rows
  stay from earlier batches: the model treats rows independently and the
  outputs are sliced back), copied into the device tensors
  (``OrtValue.update_inplace``) and run with ``run_with_iobinding``; no
  per-batch allocation of inputs on either side.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from worker.config import DEVICES
from worker.contract.errors import ConfigError, InferenceError, ModelError
from worker.contract.manifest import MODEL_FILE, InputInfo, Manifest, load_manifest
from worker.contract.records import Event, Prediction

log = logging.getLogger(__name__)

#: cuDNN convolution algorithm search of the CUDA provider (ORT's own default is EXHAUSTIVE).
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
#: Batch buckets of the IO-binding path when none are given: powers of two up to 1024.
DEFAULT_BATCH_BUCKETS = tuple(2**k for k in range(11))
#: At most this many buckets keep their buffers; the oldest is dropped beyond it.
MAX_BOUND_BUCKETS = 64
_PAGE = 4096
_CUDART_SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


class Session(Protocol):
    """The slice of ``onnxruntime.InferenceSession`` the worker uses (fakes in unit tests)."""

    def run(
        self, output_names: Sequence[str] | None, input_feed: dict[str, NDArray[Any]]
    ) -> list[NDArray[Any]]: ...


@runtime_checkable
class BindingSession(Protocol):
    """What the IO-binding path needs on top of :class:`Session` (a real ORT session)."""

    def run(
        self, output_names: Sequence[str] | None, input_feed: dict[str, NDArray[Any]]
    ) -> list[NDArray[Any]]: ...

    def io_binding(self) -> Any: ...

    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None: ...


@dataclass(frozen=True)
class SessionInfo:
    """What runs: the provider in use, and all providers the session was given."""

    provider: str
    providers: tuple[str, ...]


def cuda_provider_options(conv_algo_search: str = "HEURISTIC", tf32: bool = True) -> dict[str, str]:
    """Options of ``CUDAExecutionProvider``.

    ``cudnn_conv_algo_search`` HEURISTIC (not ORT's default, EXHAUSTIVE): EXHAUSTIVE
    times every cuDNN algorithm the first time each input shape is seen, which can
    cost tens to hundreds of ms on that (live) batch, once per batch size; HEURISTIC
    takes cuDNN's pick at once. The reference model has
    three small convolutions, so a better algorithm can win little, while a
    streaming worker sees new batch sizes at any time. ``deploy/gpu/bench-gpu.sh``
    measures both (first-run ms per shape and throughput).
    ``do_copy_in_default_stream``: copies on the compute stream, so they are ordered
    with the kernels.
    ``use_tf32`` (``tf32``, on by default, as ORT's): float32 convolutions and matrix
    products on TF32 tensor cores (Ampere and later). Outputs then differ from a
    float32 run by about 1e-4..1e-3, and between batch shapes too; a strict parity
    check (against CPU, or bound against plain) passes ``tf32=False``.
    """
    if conv_algo_search not in CONV_ALGO_SEARCHES:
        raise ConfigError(
            f"cudnn_conv_algo_search must be one of {CONV_ALGO_SEARCHES}, not {conv_algo_search!r}"
        )
    return {
        "cudnn_conv_algo_search": conv_algo_search,
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if tf32 else "0",
    }


def create_session(
    model_path: Path,
    device: str,
    intra_op_threads: int = 0,
    *,
    conv_algo_search: str = "HEURISTIC",
    tf32: bool = True,
) -> tuple[Session, SessionInfo]:
    """An ORT session on ``device`` (auto = CUDA when it works, else CPU); ``conv_algo_search``
    and ``tf32``: see :func:`cuda_provider_options`."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, not {device!r}")
    cuda_options = cuda_provider_options(conv_algo_search, tf32)
    available = ort.get_available_providers()
    want: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if device in ("auto", "cuda"):
        if "CUDAExecutionProvider" in available:
            want.insert(0, ("CUDAExecutionProvider", cuda_options))
        elif device == "cuda":
            raise ModelError(
                "--device cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install the [gpu] extra"
            )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), sess_options=opts, providers=want)
    except Exception as exc:  # ORT raises its own untyped exceptions
        raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
    used = tuple(session.get_providers())
    if device == "cuda" and used[0] != "CUDAExecutionProvider":
        raise ModelError(
            f"--device cuda: CUDA did not initialise, the session would run on {list(used)}: "
            f"{_cuda_driver_problem()}"
        )
    info = SessionInfo(provider=used[0], providers=used)
    log.info("model %s runs on %s (asked %s)", model_path, info.provider, want)
    return session, info


#: The NVIDIA driver's CUDA library: on the host, or mounted by the container runtime.
CUDA_DRIVER = "libcuda.so.1"


def _cuda_driver_problem() -> str:
    """Why ORT's CUDA provider did not start, as far as can be told without ORT's log:
    most often the driver library is not there (no GPU, or no NVIDIA container runtime)."""
    try:
        ctypes.CDLL(CUDA_DRIVER)
    except OSError as exc:
        return (
            f"the NVIDIA driver's {CUDA_DRIVER} cannot be loaded: {exc}; run on a GPU node "
            "with the NVIDIA driver (in a container: the NVIDIA container runtime), or use "
            "--device auto to fall back to the CPU"
        )
    return f"the driver's {CUDA_DRIVER} loads, but the CUDA provider did not start: see its log"


def buckets_up_to(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    if max_batch_size <= 0:
        raise ConfigError(f"max_batch_size must be > 0, not {max_batch_size}")
    return (*(b for b in DEFAULT_BATCH_BUCKETS if b < max_batch_size), max_batch_size)


# ------------------------------------------------------------------ page-locked host buffers


def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime this process has already loaded (ORT's CUDA provider), else None.

    RTLD_NOLOAD: never loads a second runtime, only finds the one in use.
    """
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    for name in _CUDART_SONAMES:
        try:
            lib = ctypes.CDLL(name, mode=noload | os.RTLD_NOW)
        except OSError:
            continue
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaGetLastError.argtypes = []
        lib.cudaGetLastError.restype = ctypes.c_int
        return lib
    return None


def _unregister(lib: ctypes.CDLL, ptr: int) -> None:
    lib.cudaHostUnregister(ctypes.c_void_p(ptr))


def host_buffer(
    shape: tuple[int, ...], dtype: str, cudart: ctypes.CDLL | None
) -> tuple[NDArray[Any], bool]:
    """A zeroed, page-aligned C-contiguous array; page-locked when ``cudart`` is given.

    Returns the array and whether ``cudaHostRegister`` pinned it. The pages it spans
    belong to it alone (so registering never overlaps another buffer); it is
    unregistered before its memory is freed.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    span = -(-max(nbytes, 1) // _PAGE) * _PAGE
    raw = np.zeros(span + _PAGE, dtype=np.uint8)
    offset = (-raw.ctypes.data) % _PAGE
    arr = raw[offset : offset + nbytes].view(dt).reshape(shape)
    if cudart is None or nbytes == 0:
        return arr, False
    ptr = raw.ctypes.data + offset
    rc = cudart.cudaHostRegister(ctypes.c_void_p(ptr), span, 0)
    if rc != 0:
        # A failed call also leaves the thread's last CUDA error set, and ORT's CUDA kernels
        # check cudaGetLastError() after each launch: the next batch would fail with this
        # stale error. Reading it clears it.
        cudart.cudaGetLastError()
        log.warning("cudaHostRegister(%d bytes) failed with CUDA error %d: pageable", span, rc)
        return arr, False
    # `arr` is a view: it keeps `raw` alive, and `raw` is unregistered before it is freed.
    weakref.finalize(raw, _unregister, cudart, ptr).atexit = False
    return arr, True


# ------------------------------------------------------------------ the runner


@dataclass
class _Bucket:
    """Buffers of one padded batch size: host arrays, device tensors, their IOBinding."""

    size: int
    binding: Any
    host: dict[str, NDArray[Any]]
    device: dict[str, Any]
    pinned: bool
    runs: int = field(default=0)
    #: Constant inputs' device tensors, copied and bound once.
    fixed: dict[str, Any] = field(default_factory=dict)


class ModelRunner:
    """Stacks a batch of events, runs the session, and builds predictions.

    Args:
        manifest, session, info: the model and its ORT session (:func:`create_session`).
        io_binding: run through ORT IO binding (see the module doc); default: only
            when the session really runs on ``CUDAExecutionProvider``. On another
            provider the tensors are bound on the CPU (what the tests exercise).
        batch_buckets: batch sizes a bound batch is padded up to (the next one at
            least as large; a larger batch runs at its own size); default
            :data:`DEFAULT_BATCH_BUCKETS`; ``()`` = no padding.
        pin_host: page-lock the bound host buffers; default: on CUDA. Best effort:
            needs the CUDA runtime ORT loaded, else pageable buffers (logged).

    Not thread-safe: one thread runs batches (the worker's inference thread).
    """

    def __init__(
        self,
        manifest: Manifest,
        session: Session,
        info: SessionInfo,
        *,
        io_binding: bool | None = None,
        batch_buckets: Sequence[int] | None = None,
        pin_host: bool | None = None,
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.info = info
        self.output_names = [o.name for o in manifest.outputs]
        self.model_ref = {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
        }
        self._blanks: dict[str, dict[str, NDArray[Any]]] = {}
        # Each batched input's part; constant inputs are fed their value.
        self._part_of = {name: p.name for p in manifest.parts for name in p.input_names}
        self._constants = {c.input.name: c for c in manifest.constants}
        self._stacked = [i for i in manifest.inputs if i.name in self._part_of]
        self._tagged = [(k, o) for k, o in enumerate(manifest.outputs) if o.kind == "multilabel"]
        self._label_index = (
            self.output_names.index(manifest.label_output)
            if manifest.label_output in self.output_names
            else None
        )
        on_cuda = info.provider == "CUDAExecutionProvider"
        self.io_binding = on_cuda if io_binding is None else io_binding
        self.binding_device = "cuda" if on_cuda else "cpu"
        buckets = DEFAULT_BATCH_BUCKETS if batch_buckets is None else tuple(batch_buckets)
        if any(b <= 0 for b in buckets):
            raise ConfigError(f"batch buckets must be positive: {buckets}")
        self.batch_buckets = tuple(sorted(set(buckets)))
        self.pin_host = on_cuda if pin_host is None else pin_host
        self._buckets: dict[int, _Bucket] = {}
        self._cudart: ctypes.CDLL | None = None
        if self.io_binding:
            if not isinstance(session, BindingSession):
                raise ConfigError("io_binding needs an ONNX Runtime session (io_binding())")
            if self.pin_host:
                self._cudart = _loaded_cudart()
                if self._cudart is None:
                    log.warning("no loaded CUDA runtime found: bound host buffers are pageable")
            log.info(
                "IO binding on %s, batch buckets %s, page-locked host buffers %s",
                self.binding_device,
                self.batch_buckets or "none",
                self._cudart is not None,
            )

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "auto",
        intra_op_threads: int = 0,
        *,
        io_binding: bool | None = None,
        max_batch_size: int | None = None,
        conv_algo_search: str = "HEURISTIC",
        pin_host: bool | None = None,
        tf32: bool = True,
    ) -> ModelRunner:
        """Verify and load ``model_dir``; ``max_batch_size`` caps the padding buckets."""
        manifest = load_manifest(model_dir, verify=True)
        session, info = create_session(
            Path(model_dir) / MODEL_FILE,
            device,
            intra_op_threads,
            conv_algo_search=conv_algo_search,
            tf32=tf32,
        )
        buckets = None if max_batch_size is None else buckets_up_to(max_batch_size)
        return cls(
            manifest,
            session,
            info,
            io_binding=io_binding,
            batch_buckets=buckets,
            pin_host=pin_host,
        )

    @property
    def required_parts(self) -> frozenset[str]:
        """The parts an event needs to be complete."""
        return frozenset(self.manifest.part_names)

    @property
    def pinned(self) -> bool:
        """Whether the bound host buffers are page-locked (those allocated so far)."""
        return bool(self._buckets) and all(b.pinned for b in self._buckets.values())

    def feed(self, events: Sequence[Event]) -> dict[str, NDArray[Any]]:
        """Stack each input over the batch (parts an incomplete event lacks are blanked),
        and the constants."""
        feed = {}
        for i in self._stacked:
            feed[i.name] = np.stack(self._rows(events, i.name)).astype(i.dtype, copy=False)
        return self.with_constants(feed, len(events))

    def with_constants(self, feed: dict[str, NDArray[Any]], n: int) -> dict[str, NDArray[Any]]:
        """``feed`` plus every constant input it lacks, for a batch of ``n``."""
        for name, const in self._constants.items():
            if name not in feed:
                feed[name] = self._constant(const.input, n)
        return feed

    def _constant(self, info: InputInfo, n: int) -> NDArray[Any]:
        value = self._constants[info.name].array
        if not info.batched:
            return value
        return np.ascontiguousarray(np.broadcast_to(value, (n, *info.shape)))

    def _rows(self, events: Sequence[Event], name: str) -> list[NDArray[Any]]:
        part = self._part_of[name]
        return [
            e.parts[part].tensors[name] if part in e.parts else self._blank(part)[name]
            for e in events
        ]

    def _blank(self, part_name: str) -> dict[str, NDArray[Any]]:
        if part_name not in self._blanks:
            part = self.manifest.part(part_name)
            if part is None:
                raise InferenceError(f"no part {part_name!r}")
            self._blanks[part_name] = part.blank()
        return self._blanks[part_name]

    def run(self, feed: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
        """The outputs (in ``output_names`` order) of one stacked batch."""
        n = next((len(feed[i.name]) for i in self._stacked if i.name in feed), 0)
        feed = self.with_constants(dict(feed), n)
        if self.io_binding:
            return self._run_feed_bound(feed)
        try:
            return self.session.run(self.output_names, feed)
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise InferenceError(f"ONNX Runtime failed on a batch: {exc}") from exc

    # -------------------------------------------------------------- IO binding

    def bucket_for(self, n: int) -> int:
        """The padded batch size of a batch of ``n``."""
        for b in self.batch_buckets:
            if b >= n:
                return b
        return n

    def _bucket(self, n: int) -> _Bucket:
        size = self.bucket_for(n)
        bucket = self._buckets.get(size)
        if bucket is None:
            if len(self._buckets) >= MAX_BOUND_BUCKETS:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[size] = self._new_bucket(size)
        return bucket

    def _new_bucket(self, size: int) -> _Bucket:
        import onnxruntime as ort

        host: dict[str, NDArray[Any]] = {}
        device: dict[str, Any] = {}
        pinned = True
        try:
            binding = self.session.io_binding()  # type: ignore[attr-defined]
            fixed = {}
            for name, const in self._constants.items():
                value = self._constant(const.input, size)
                fixed[name] = ort.OrtValue.ortvalue_from_numpy(value, self.binding_device, 0)
                binding.bind_ortvalue_input(name, fixed[name])
            for i in self._stacked:
                shape = (size, *i.shape)
                host[i.name], ok = host_buffer(shape, i.dtype, self._cudart)
                pinned = pinned and ok
                device[i.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, np.dtype(i.dtype).type, self.binding_device, 0
                )
                binding.bind_ortvalue_input(i.name, device[i.name])
            for name in self.output_names:
                binding.bind_output(name, "cpu")
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise InferenceError(
                f"ONNX Runtime cannot bind a batch of {size} on {self.binding_device}: {exc}"
            ) from exc
        log.debug("bound batch bucket %d on %s (pinned %s)", size, self.binding_device, pinned)
        return _Bucket(size, binding, host, device, pinned, fixed=fixed)

    def _run_feed_bound(self, feed: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
        names = {i.name for i in self.manifest.inputs}
        if set(feed) != names:
            raise InferenceError(f"the feed has inputs {sorted(feed)}; the model {sorted(names)}")
        n = -1
        for i in self._stacked:
            arr = feed[i.name]
            if arr.ndim != len(i.shape) + 1 or tuple(arr.shape[1:]) != i.shape:
                raise InferenceError(
                    f"input {i.name!r}: shape {list(arr.shape)}, model wants [n, {list(i.shape)}]"
                )
            if n not in (-1, arr.shape[0]):
                raise InferenceError(f"inputs disagree on the batch size ({n}, {arr.shape[0]})")
            n = arr.shape[0]
        if n <= 0:
            raise InferenceError("an empty batch")
        bucket = self._bucket(n)
        sources = {}
        for i in self._stacked:
            arr = feed[i.name]
            if (
                n == bucket.size
                and not bucket.pinned
                and arr.dtype == np.dtype(i.dtype)
                and arr.flags.c_contiguous
            ):
                sources[i.name] = arr  # copied to the device straight from the caller's array
            else:
                np.copyto(bucket.host[i.name][:n], arr, casting="same_kind")
                sources[i.name] = bucket.host[i.name]
        return self._run_bound(bucket, n, sources)

    def _infer_bound(self, events: Sequence[Event]) -> list[NDArray[Any]]:
        n = len(events)
        if n == 0:
            raise InferenceError("an empty batch")
        bucket = self._bucket(n)
        for i in self._stacked:
            np.stack(self._rows(events, i.name), out=bucket.host[i.name][:n])
        return self._run_bound(bucket, n, bucket.host)

    def _run_bound(
        self, bucket: _Bucket, n: int, sources: dict[str, NDArray[Any]]
    ) -> list[NDArray[Any]]:
        try:
            for name, value in bucket.device.items():
                # update_inplace's copy is complete when it returns (no device-wide
                # synchronize_inputs() after it). Then bind again: if ORT had copied the
                # bound tensor elsewhere for a node placed on another device, the old
                # binding would read that stale copy; with the devices matching, binding
                # only swaps a pointer.
                value.update_inplace(sources[name])
                bucket.binding.bind_ortvalue_input(name, value)
            self.session.run_with_iobinding(bucket.binding)  # type: ignore[attr-defined]
            outputs: list[NDArray[Any]] = bucket.binding.copy_outputs_to_cpu()
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise InferenceError(f"ONNX Runtime failed on a bound batch: {exc}") from exc
        bucket.runs += 1
        return outputs if n == bucket.size else [o[:n] for o in outputs]

    # -------------------------------------------------------------- predictions

    def predict(self, events: Sequence[Event], clock: Callable[[], int]) -> list[Prediction]:
        """Run one batch; ``clock`` (ms) stamps ``inferred_ms`` after ORT returns."""
        outputs = self._infer_bound(events) if self.io_binding else self.run(self.feed(events))
        now_ms = clock()
        labels = self.manifest.labels
        n = len(events)
        # The whole batch at once: one conversion to Python values per output (floats by
        # way of float64, so float32 values print exactly), one argmax.
        rows = [_rows_of(out, n) for out in outputs]
        tops: list[int] = []
        top_scores: list[float] = []
        if self._label_index is not None:
            scores = np.asarray(outputs[self._label_index][:n], dtype=np.float64).reshape(n, -1)
            argmax = np.argmax(scores, axis=1)
            tops = argmax.tolist()
            if self.manifest.outputs[self._label_index].kind == "logits":
                scores = _softmax(scores)
            top_scores = scores[np.arange(n), argmax].tolist()
        tags = self._tags(outputs, n)
        preds = []
        for row, event in enumerate(events):
            values = {name: out[row] for name, out in zip(self.output_names, rows, strict=True)}
            label = score = None
            if self._label_index is not None:
                top = tops[row]
                label, score = labels[top] if top < len(labels) else str(top), top_scores[row]
            preds.append(
                Prediction(
                    event_id=event.event_id,
                    outputs=values,
                    label=label,
                    score=score,
                    modalities=tuple(sorted(event.parts)),
                    missing=event.missing,
                    tags=None if tags is None else {k: v[row] for k, v in tags.items()},
                    timing={
                        "last_part_ms": event.last_part_ms,
                        "completed_ms": event.completed_ms,
                        "inferred_ms": now_ms,
                        "batch_size": len(events),
                    },
                )
            )
        return preds

    def _tags(self, outputs: Sequence[NDArray[Any]], n: int) -> dict[str, list[list[str]]] | None:
        """Per multi-label output, each row's labels at or over their thresholds."""
        if not self._tagged:
            return None
        tags = {}
        for k, info in self._tagged:
            scores = np.asarray(outputs[k][:n], dtype=np.float64).reshape(n, -1)
            if info.from_logits:
                scores = 1.0 / (1.0 + np.exp(-scores))
            over = scores >= np.asarray(info.thresholds, dtype=np.float64)
            tags[info.name] = [[info.labels[j] for j in np.flatnonzero(r)] for r in over]
        return tags


def _rows_of(out: NDArray[Any], n: int) -> list[Any]:
    """One output's values per row: a flat list, or nested lists for more than one axis
    per example; integers stay integers."""
    arr = np.asarray(out[:n])
    if arr.dtype.kind not in "iub":
        arr = arr.astype(np.float64)
    if arr.ndim <= 2:
        arr = arr.reshape(n, -1)
    rows: list[Any] = arr.tolist()
    return rows


def _softmax(x: NDArray[np.float64]) -> NDArray[np.float64]:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out
