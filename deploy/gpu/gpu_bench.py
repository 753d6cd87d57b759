"""Raw ONNX Runtime throughput of mmstream model directories, with and without IO binding.

Run by ``deploy/gpu/bench-gpu.sh`` (see README.md beside it) from the repository root
with ``PYTHONPATH=.``. It imports only ``worker.inference.model``,
``worker.contract.manifest``, ``worker.contract.transforms``,
``worker.contract.reference_data`` and ``worker.inference.rawort`` (numpy, Pillow,
ONNX Runtime), so it runs where kafka-python is missing; the raw-ORT loop is
``worker.inference.rawort.bench_ort``, the one ``mmstream bench`` uses.

Per model and variant (a fresh session each): the first run at each batch size (a new
shape: buffers, cuDNN algorithm choice), then events/s per batch size. Variants on
CUDA: ``plain`` (session.run), ``iobinding`` (page-locked host buffers, HEURISTIC),
``iobinding-pageable``, ``iobinding-exhaustive`` (cudnn_conv_algo_search EXHAUSTIVE);
on CPU (``--device cpu``, a test of this script): ``plain`` and ``iobinding``. Also
the largest difference between the bound and the plain outputs (padded batches too).

    python3 deploy/gpu/gpu_bench.py --model DIR [--model DIR ...] --device cuda \\
        --json OUT/gpu-bench.json --md OUT/gpu-bench.md
    python3 deploy/gpu/gpu_bench.py --probe --model DIR   # exit 0 iff CUDA really runs
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger("gpu_bench")

PARITY_SIZES = (5, 8, 32)


def preload(how: str) -> str:
    """Make the CUDA/cuDNN libraries of the nvidia-* wheels loadable before ORT needs them."""
    if how == "torch":
        import torch  # its import loads libcudart, cuBLAS and cuDNN globally

        return f"torch {torch.__version__}"
    import onnxruntime as ort

    if how in ("ort", "auto") and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # best effort; the session tells whether CUDA works
            return f"onnxruntime.preload_dlls failed: {exc}"
        return "onnxruntime.preload_dlls"
    return "none"


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count() or 0,
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "ort_device": ort.get_device(),
        "available_providers": ort.get_available_providers(),
        # the CUDA/cuDNN wheels ORT's CUDA provider loads, by version
        "nvidia_wheels": {
            d.metadata["Name"]: d.version
            for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("nvidia-")
        },
    }
    if hasattr(ort, "print_debug_info"):  # the build's CUDA/cuDNN versions, to the log
        ort.print_debug_info()
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.max.sm"
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["gpu"] = proc.stdout.strip() or proc.stderr.strip()
    return info


def first_runs(runner: Any, pool: dict[str, NDArray[Any]], sizes: list[int]) -> dict[str, float]:
    """ms of the first run at each batch size (a shape the session has not seen)."""
    from worker.inference.rawort import ort_feed  # after preload(): it imports ONNX Runtime

    out = {}
    for b in sizes:
        feed = ort_feed(pool, b)
        t = time.perf_counter()
        runner.run(feed)
        out[str(b)] = round(1000.0 * (time.perf_counter() - t), 3)
    return out


def parity(plain: Any, bound: Any, pool: dict[str, NDArray[Any]]) -> dict[str, Any]:
    from worker.inference.rawort import ort_feed

    worst = 0.0
    per: dict[str, float] = {}
    for n in PARITY_SIZES:
        feed = ort_feed(pool, n)
        a, b = plain.run(feed), bound.run(feed)
        diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
        per[f"{n} (bucket {bound.bucket_for(n)})"] = diff
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "per_batch": per}


def variants(device: str) -> list[tuple[str, dict[str, Any]]]:
    if device == "cpu":
        return [("plain", {"io_binding": False}), ("iobinding", {"io_binding": True})]
    return [
        ("plain", {"io_binding": False}),
        ("iobinding", {"io_binding": True}),
        ("iobinding-pageable", {"io_binding": True, "pin_host": False}),
        ("iobinding-exhaustive", {"io_binding": True, "conv_algo_search": "EXHAUSTIVE"}),
    ]


def bench_model(
    model_dir: Path, device: str, sizes: list[int], seconds: float, seed: int
) -> dict[str, Any]:
    from worker.contract.manifest import load_manifest
    from worker.inference.model import ModelRunner
    from worker.inference.rawort import ORT_POOL, bench_ort, example_pool

    manifest = load_manifest(model_dir, verify=True)
    pool = example_pool(manifest, ORT_POOL, seed)
    result: dict[str, Any] = {
        "model_dir": str(model_dir),
        "name": manifest.name,
        "version": manifest.version,
        "inputs": {i.name: [i.dtype, list(i.shape)] for i in manifest.inputs},
        "variants": [],
    }
    plain = None
    for name, kwargs in variants(device):
        t = time.perf_counter()
        runner = ModelRunner.load(model_dir, device, max_batch_size=max(sizes), **kwargs)
        load_s = time.perf_counter() - t
        v: dict[str, Any] = {
            "variant": name,
            "provider": runner.info.provider,
            "io_binding": runner.io_binding,
            "conv_algo_search": kwargs.get("conv_algo_search", "HEURISTIC"),
            "batch_buckets": list(runner.batch_buckets) if runner.io_binding else [],
            "load_s": round(load_s, 3),
            "first_run_ms": first_runs(runner, pool, sizes),
        }
        v["pinned"] = runner.pinned if runner.io_binding else None
        v["raw_ort"] = bench_ort(runner, sizes, seconds, seed)
        for row in v["raw_ort"]:
            print(
                f"  {manifest.name} {name:22s} batch {row['batch_size']:4d}: "
                f"{row['events_per_s']:10.0f} events/s  {row['ms_per_batch']:8.3f} ms/batch",
                flush=True,
            )
        if name == "plain":
            plain = runner
        elif name == "iobinding" and plain is not None:
            result["parity"] = parity(plain, runner, pool)
            print(f"  parity bound vs plain: {result['parity']}", flush=True)
            plain = None
        result["variants"].append(v)
        del runner
        gc.collect()  # frees the session, its device memory and page-locked buffers
    # The parity above runs with TF32 (ORT's CUDA default, the worker's): bound and plain
    # may differ by ~1e-4..1e-3 between batch shapes. Without TF32 they must agree to ~1e-6.
    strict = [
        ModelRunner.load(model_dir, device, max_batch_size=max(sizes), tf32=False, **kwargs)
        for kwargs in ({"io_binding": False}, {"io_binding": True})
    ]
    result["parity_strict"] = parity(strict[0], strict[1], pool)
    print(f"  parity bound vs plain, TF32 off: {result['parity_strict']}", flush=True)
    del strict
    gc.collect()
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Raw ONNX Runtime, {report['device']}", ""]
    m = report["machine"]
    lines += [
        f"{m.get('gpu', 'no GPU')}; onnxruntime {m['onnxruntime']} ({m['ort_device']}); "
        f"python {m['python']}; {m['cpu_count']} CPUs; {m['date']}",
        "",
    ]
    for model in report["models"]:
        names = [v["variant"] for v in model["variants"]]
        lines += [
            f"## {model['name']} {model['version']} {model['inputs']}",
            "",
            "raw ORT loop: worker.inference.rawort.bench_ort; "
            f"parity bound vs plain: {model.get('parity', {}).get('max_abs_diff')} "
            f"(TF32 off: {model.get('parity_strict', {}).get('max_abs_diff')})",
            "",
            "events/s (ms/batch):",
            "",
            "| batch | " + " | ".join(names) + " |",
            "| ---: |" + " ---: |" * len(names),
        ]
        sizes = [r["batch_size"] for r in model["variants"][0]["raw_ort"]]
        for k, b in enumerate(sizes):
            cells = [
                f"{v['raw_ort'][k]['events_per_s']:.0f} ({v['raw_ort'][k]['ms_per_batch']:.3f})"
                for v in model["variants"]
            ]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines += ["", "first run at each batch size, ms (load s):", ""]
        lines += ["| batch | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for b in sizes:
            cells = [f"{v['first_run_ms'][str(b)]:.1f}" for v in model["variants"]]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        loads = " | ".join(f"{v['load_s']:.2f}" for v in model["variants"])
        lines.append(f"| load s | {loads} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def probe(model_dir: Path) -> int:
    from worker.contract.errors import MMStreamError
    from worker.contract.manifest import MODEL_FILE
    from worker.inference.model import create_session

    try:
        _, info = create_session(model_dir / MODEL_FILE, "cuda")
    except MMStreamError as exc:
        print(f"probe: CUDA does not run: {exc}", flush=True)
        return 1
    print(f"probe: session runs on {list(info.providers)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch-sizes", default="1,8,32,128,512")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per point")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--preload", choices=("auto", "ort", "torch", "none"), default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--probe", action="store_true", help="only check that CUDA really runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preloaded = preload(args.preload) if args.device == "cuda" else "none"
    log.info("preload: %s", preloaded)
    if args.probe:
        return probe(args.model[0])
    sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    report: dict[str, Any] = {
        "device": args.device,
        "preload": preloaded,
        "machine": machine_info(),
        "settings": {"batch_sizes": sizes, "seconds_per_point": args.seconds, "seed": args.seed},
        "models": [],
    }
    for model_dir in args.model:
        print(f"raw ORT: {model_dir} on {args.device}", flush=True)
        report["models"].append(bench_model(model_dir, args.device, sizes, args.seconds, args.seed))
        if args.json:  # after each model, so a timeout keeps what was measured
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(report))
    print(markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
