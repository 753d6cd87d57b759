"""``make image-test``: build the CPU image here with buildah and run its own ``mmstream``.

No Docker engine is needed, nor a registry: the base image is a Debian 12 root file
system made with mmdebstrap (Python 3.11 from Debian) and imported with podman; pip in
the build installs from a wheelhouse made on the host (``make wheelhouse``), since a
build step here reaches no package index. Then, against a broker started for the run
(``deploy/local/kafka.sh``):

1. a worker from the image (``buildah run``, which shares the host's network) gets a
   small stream of raw events produced from the host and must predict every one;
2. its process must run as the image's non-root user (uid 10001);
3. a SIGTERM must drain it with exit 0.

It reports the image's size, the build time and the time from start to ready
(``/readyz``), and writes them to ``<work dir>/report.json``. One line naming the cause
and exit 1 when a check fails; exit 2 when a tool is missing and cannot be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/mmstream-base:bookworm"
IMAGE = "localhost/mmstream:cpu-test"
IMAGE_UID = 10001
TOOLS = {"buildah": "podman", "podman": "podman", "mmdebstrap": "mmdebstrap"}


class ImageTestError(Exception):
    """A failed check: one line, exit 1."""


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, check=True, text=True, **kw)


def ensure_tools() -> None:
    """buildah, podman (for ``import``) and mmdebstrap; installed with apt-get when absent."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    apt = ["apt-get", "install", "-y", "-q", *missing]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            sys.exit(f"image-test: {' and '.join(missing)} missing; install them: {' '.join(apt)}")
        apt = ["sudo", *apt]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if subprocess.run(apt, env=env).returncode != 0:  # stale package lists: refresh once
            run([*apt[: apt.index("install")], "update", "-q"], env=env)
            run(apt, env=env)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        sys.exit(f"image-test: cannot install {' and '.join(missing)} ({exc})")


def ensure_base(work: Path, suite: str) -> None:
    """A minimal Debian root file system with Python 3.11, imported as BASE_IMAGE (once)."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    tar = work / f"rootfs-{suite}.tar"
    if not tar.exists():
        partial = work / f"rootfs-{suite}.partial.tar"  # mmdebstrap: the format from the name
        run(
            ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             suite, str(partial)]
        )  # fmt: skip
        partial.rename(tar)
    run(["podman", "import", str(tar), BASE_IMAGE], stdout=subprocess.DEVNULL)


def build(wheelhouse: Path, model: Path) -> float:
    t = time.monotonic()
    run(
        ["buildah", "bud", "--isolation", "chroot", "--layers",
         "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
         "--build-arg", f"WHEELHOUSE={wheelhouse.relative_to(ROOT)}",
         "--build-arg", f"MODEL_DIR={model.relative_to(ROOT)}",
         "-f", "deploy/docker/Dockerfile.cpu", "-t", IMAGE, "."],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - t


def image_size_bytes() -> int:
    out = run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], capture_output=True)
    return int(out.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def worker_process(marker: str) -> tuple[int, int] | None:
    """(pid, uid) of the image's Python process whose command line has ``marker``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if marker.encode() in argv and argv[0].endswith(b"python3"):
            uid = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Uid:"))
            return int(proc.name), uid
    return None


def test_image(work: Path, events: int, bootstrap: str) -> dict[str, Any]:
    from worker.edge.kafka_io import ensure_topics, read_records
    from worker.tools.produce import ProduceConfig, produce

    run_id = uuid.uuid4().hex[:8]
    t_in, t_out, group = f"image-{run_id}-in", f"image-{run_id}-out", f"image-test-{run_id}"
    ensure_topics(bootstrap, {t_in: 2, t_out: 2, f"{t_in}.dlq": 1})
    labels = work / "labels.jsonl"
    produce(
        ProduceConfig(
            bootstrap_servers=bootstrap, topic=t_in, count=events, content="raw",
            key_prefix=f"img-{run_id}-", client_id="mmstream-image-test", labels_out=labels,
        )
    )  # fmt: skip
    want = {json.loads(line)["event_id"] for line in labels.read_text().splitlines()}
    ctr = run(
        ["buildah", "from", "--name", f"mmstream-image-test-{run_id}", IMAGE], capture_output=True
    ).stdout.strip()
    port = free_port()
    log_path = work / "worker.log"
    argv = [
        "buildah", "run", "--isolation", "chroot", "--env", f"MMSTREAM_HTTP_PORT={port}", ctr,
        "--", "mmstream", "worker", "--bootstrap-servers", bootstrap, "--input-topic", t_in,
        "--output-topic", t_out, "--group-id", group,
    ]  # fmt: skip
    try:
        with log_path.open("w") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            try:
                ready_s = _wait_ready(proc, port, t0, log_path)
                found = worker_process(group)
                if found is None:
                    raise ImageTestError("the worker's process was not found in /proc")
                pid, uid = found
                if uid != IMAGE_UID:
                    raise ImageTestError(
                        f"the worker runs as uid {uid}, not the image's {IMAGE_UID}"
                    )
                got = read_records(
                    bootstrap, t_out, lambda rs: want <= {(r.key or b"").decode() for r in rs}, 120
                )
                seen = {(r.key or b"").decode() for r in got}
                if not want <= seen:
                    raise ImageTestError(
                        f"{len(want - seen)} of {events} events got no prediction from the image"
                    )
                os.kill(pid, signal.SIGTERM)
                code = proc.wait(timeout=60)
                if code != 0:
                    raise ImageTestError(f"after SIGTERM the worker exited {code}, not 0")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    except ImageTestError as exc:
        tail = log_path.read_text().splitlines()[-15:] if log_path.exists() else []
        print("\n".join(tail), file=sys.stderr)
        raise exc
    finally:
        subprocess.run(["buildah", "rm", ctr], stdout=subprocess.DEVNULL)
    return {"events": events, "predicted": len(want), "uid": uid, "ready_s": round(ready_s, 2)}


def _wait_ready(proc: subprocess.Popen[bytes], port: int, t0: float, log_path: Path) -> float:
    while time.monotonic() - t0 < 90:
        if proc.poll() is not None:
            raise ImageTestError(f"the worker exited {proc.returncode} before it was ready")
        if http_status(port, "/readyz") == 200:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise ImageTestError("the worker was not ready within 90 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "image-test")
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / ".cache" / "wheelhouse-cpu")
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "reference-onnx")
    parser.add_argument("--suite", default="bookworm", help="Debian suite of the base")
    parser.add_argument("--events", type=int, default=40)
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for path, how in ((args.wheelhouse, "make wheelhouse"), (args.model, "make model")):
        if not path.is_dir():
            print(f"image-test: {path} is missing: run {how}", file=sys.stderr)
            return 2
    ensure_tools()
    ensure_base(work, args.suite)
    build_s = build(args.wheelhouse.resolve(), args.model.resolve())
    size = image_size_bytes()
    kafka_sh = ROOT / "deploy" / "local" / "kafka.sh"
    kafka_dir = work / "kafka"
    port, controller = free_port(), free_port()
    start = ["bash", str(kafka_sh), "start", "--port", str(port)]
    start += ["--controller-port", str(controller), "--data-dir", str(kafka_dir)]
    run([*start, "--initial-rebalance-delay-ms", "0"])
    try:
        result = test_image(work, args.events, f"127.0.0.1:{port}")
    except ImageTestError as exc:
        print(f"image-test: {exc}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["bash", str(kafka_sh), "stop", "--data-dir", str(kafka_dir)])
    report = {
        "image": IMAGE,
        "base": BASE_IMAGE,
        "size_mb": round(size / 1e6, 1),
        "build_s": round(build_s, 1),
        **result,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"image-test: ok: {IMAGE} ({report['size_mb']} MB, built in {report['build_s']} s) "
        f"predicted {result['predicted']}/{result['events']} events as uid {result['uid']}, "
        f"ready {result['ready_s']} s after start, drained with exit 0 on SIGTERM"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
