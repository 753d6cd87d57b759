"""Raw ONNX Runtime throughput: ``session.run`` alone on real preprocessed examples.

The ceiling the worker is measured against (``mmstream bench``, step 1) and what
``deploy/gpu/gpu_bench.py`` measures on a GPU. No Kafka here: this module imports
only numpy, ONNX Runtime (through :mod:`worker.inference.model`) and the preprocessing, so it
runs where kafka-python is not installed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.contract.manifest import Manifest
from worker.contract.reference_data import sample_tensors, samples
from worker.inference.model import ModelRunner

log = logging.getLogger(__name__)

#: Timed repeats per raw-ORT batch size (the median is reported).
ORT_REPEATS = 3
#: Distinct real examples the raw-ORT batches are built from (cycled).
ORT_POOL = 64


def example_pool(manifest: Manifest, n: int, seed: int) -> dict[str, NDArray[Any]]:
    """``n`` real examples per input a part fills, preprocessed as the producer's npy
    parts are: input name -> array ``(n, *shape)`` (the runner adds the constants)."""
    rows: dict[str, list[NDArray[Any]]] = {}
    for sample in samples(n, np.random.default_rng(seed), split="test"):
        for name, tensor in sample_tensors(sample, manifest).items():
            rows.setdefault(name, []).append(tensor)
    return {name: np.stack(r) for name, r in rows.items()}


def ort_feed(pool: dict[str, NDArray[Any]], batch_size: int) -> dict[str, NDArray[Any]]:
    """A batch of ``batch_size`` rows cycled from the pool (contiguous, like a real feed)."""
    idx = np.arange(batch_size) % len(next(iter(pool.values())))
    return {name: np.ascontiguousarray(arr[idx]) for name, arr in pool.items()}


def bench_ort(
    runner: ModelRunner, batch_sizes: list[int], seconds_per_point: float, seed: int
) -> list[dict[str, Any]]:
    """Events/s of ``session.run`` alone per batch size (median of ORT_REPEATS repeats)."""
    pool = example_pool(runner.manifest, ORT_POOL, seed)
    results = []
    for b in batch_sizes:
        feed = ort_feed(pool, b)
        for _ in range(3):  # warm-up: first runs allocate (and, on CUDA, pick kernels)
            runner.run(feed)
        rates, ms_per_batch = [], []
        for _ in range(ORT_REPEATS):
            runs = 0
            start = time.perf_counter()
            deadline = start + seconds_per_point / ORT_REPEATS
            while True:
                runner.run(feed)
                runs += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            elapsed = now - start
            rates.append(runs * b / elapsed)
            ms_per_batch.append(1000.0 * elapsed / runs)
        results.append(
            {
                "batch_size": b,
                "events_per_s": float(np.median(rates)),
                "ms_per_batch": float(np.median(ms_per_batch)),
                "repeats": [round(r, 1) for r in rates],
            }
        )
        log.info("raw ORT batch %d: %.0f events/s", b, results[-1]["events_per_s"])
    return results
