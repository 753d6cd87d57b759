"""``make image-test``: build the images here with buildah and run their own ``mmstream``.

No Docker engine is needed, nor a registry: the base image is a Debian 12 root file
system made with mmdebstrap (Python 3.11 from Debian) and imported with podman; pip in
the build installs from a wheelhouse made on the host (``make wheelhouse``), since a
build step here reaches no package index. Then, against a broker started for the run
(``deploy/local/kafka.sh``):

1. a worker from the image, run as the Deployment runs it (:class:`ReadOnlyRoot`: the
   image's user, environment and working directory, its root file system read-only, a
   fresh tmpfs at /tmp as the pod's emptyDir, the host's network), gets a small stream of
   raw events produced from the host and must predict every one;
2. its process must run as the image's non-root user (uid 10001), and that user must
   be unable to write to the root file system and able to write to /tmp;
3. a SIGTERM must drain it with exit 0.

The GPU image is built too (no GPU is needed to build it: its build checks the CUDA
libraries with ``check-cuda-libs.sh``); here, with no driver, ``--device auto`` must
pass the same checks on the CPU and log the provider it fell back to, and the image's
default ``--device cuda`` must exit non-zero with one line naming ``libcuda.so.1``.

It reports each image's size, its build time and the time from start to ready
(``/readyz``), and writes them to ``<work dir>/report.json``. One line naming the cause
and exit 1 when a check fails; exit 2 when a tool is missing and cannot be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
FLAVOURS = ("cpu", "gpu")
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


def image_name(flavour: str) -> str:
    return f"localhost/mmstream:{flavour}-test"


def build(flavour: str, wheelhouse: Path, model: Path) -> float:
    t = time.monotonic()
    run(
        ["buildah", "bud", "--isolation", "chroot", "--layers",
         "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
         "--build-arg", f"WHEELHOUSE={wheelhouse.relative_to(ROOT)}",
         "--build-arg", f"MODEL_DIR={model.relative_to(ROOT)}",
         "-f", f"deploy/docker/Dockerfile.{flavour}", "-t", image_name(flavour), "."],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - t


def image_size_bytes(image: str) -> int:
    out = run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True)
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


class ReadOnlyRoot:
    """A container of ``image`` run as a pod of deploy/k8s runs it (``readOnlyRootFilesystem``
    and an emptyDir at /tmp). buildah cannot run a container read-only, so this does what a
    runtime would: the container's root, mounted by buildah, is bound read-only in a
    private mount namespace (``unshare``) with a tmpfs on /tmp and the host's /proc, /dev
    and /sys, and the command runs there under ``chroot`` with the image's user, its
    environment only and its working directory. The network is the host's."""

    def __init__(self, image: str, work: Path) -> None:
        config = json.loads(
            run(
                ["podman", "image", "inspect", "--format", "{{json .Config}}", image],
                capture_output=True,
            ).stdout
        )
        self.user = str(config.get("User") or "0:0")
        self.env = [str(e) for e in config.get("Env") or ()]
        self.workdir = str(config.get("WorkingDir") or "/")
        self.ctr = run(["buildah", "from", image], capture_output=True).stdout.strip()
        try:
            self.root = run(["buildah", "mount", self.ctr], capture_output=True).stdout.strip()
        except subprocess.CalledProcessError:
            subprocess.run(["buildah", "rm", self.ctr], stdout=subprocess.DEVNULL)
            raise
        self.mnt = work / f"root-{self.ctr[:12]}"
        self.mnt.mkdir(parents=True, exist_ok=True)

    def argv(self, command: list[str], env: dict[str, str] | None = None) -> list[str]:
        """The host command that runs ``command`` in the container."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        setup = (
            'set -e; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; '
            'mount -t tmpfs -o size=256m,mode=1777 tmpfs "$2/tmp"; '
            'for d in proc dev sys; do mount --rbind "/$d" "$2/$d"; done; '
            f'root="$2"; shift 2; exec chroot --userspec={shlex.quote(self.user)} "$root" "$@"'
        )
        inside = ["/usr/bin/env", "-i", *self.env, *extra, "/bin/sh", "-c", 'cd "$0" && exec "$@"']
        return [
            "unshare", "--mount", "--fork", "--", "/bin/sh", "-c", setup, "sh",
            self.root, str(self.mnt), *inside, self.workdir, *command,
        ]  # fmt: skip

    def check_writable_only_at_tmp(self) -> None:
        """The image's user cannot write to its working directory (its own home, on the root
        file system), but can to /tmp."""
        probe = "touch ./.probe 2>/dev/null && echo root-writable; touch /tmp/.p && echo tmp-ok"
        out = subprocess.run(
            self.argv(["/bin/sh", "-c", probe]), capture_output=True, text=True, timeout=60
        )
        said = out.stdout.split()
        if "root-writable" in said or "tmp-ok" not in said:
            raise ImageTestError(
                "the container's root is not read-only with a writable /tmp as in the "
                f"Deployment (probe said {said}, exit {out.returncode}: {out.stderr[-200:]})"
            )

    def close(self) -> None:
        subprocess.run(["buildah", "umount", self.ctr], stdout=subprocess.DEVNULL)
        subprocess.run(["buildah", "rm", self.ctr], stdout=subprocess.DEVNULL)
        self.mnt.rmdir()


def test_image(
    work: Path, image: str, events: int, bootstrap: str, env: dict[str, str]
) -> dict[str, Any]:
    """Every event predicted by the image's worker, as uid 10001, drained by SIGTERM."""
    from worker.edge.kafka_python.admin import ensure_topics, read_records
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
    container = ReadOnlyRoot(image, work)
    port = free_port()
    log_path = work / f"worker-{run_id}.log"
    argv = container.argv(
        [
            "mmstream", "worker", "--bootstrap-servers", bootstrap, "--input-topic", t_in,
            "--output-topic", t_out, "--group-id", group,
        ],
        {"MMSTREAM_HTTP_PORT": str(port), **env},
    )  # fmt: skip
    try:
        container.check_writable_only_at_tmp()
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
        container.close()
    provider = next(
        (ln for ln in log_path.read_text().splitlines() if " runs on " in ln and "model " in ln),
        "",
    )
    return {
        "events": events,
        "predicted": len(want),
        "uid": uid,
        "root": "read-only, writable /tmp",
        "ready_s": round(ready_s, 2),
        "provider_line": provider.split(" INFO ", 1)[-1],
    }


def cuda_without_driver_fails(work: Path, image: str, bootstrap: str) -> str:
    """The GPU image's default (--device cuda) on a machine without the NVIDIA driver:
    a non-zero exit before joining, whose last line names libcuda.so.1. Returns it."""
    container = ReadOnlyRoot(image, work)
    try:
        argv = container.argv(
            [
                "mmstream", "worker", "--bootstrap-servers", bootstrap,
                "--input-topic", "image-test-never-read",
                "--output-topic", "image-test-never-written", "--group-id", "image-test-cuda",
            ]
        )  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise ImageTestError("--device cuda without a driver still ran after 120 s") from exc
    finally:
        container.close()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "exit status" not in ln]
    last = next((ln for ln in reversed(lines) if "libcuda.so.1" in ln), "")
    if proc.returncode == 0 or not last:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise ImageTestError(
            f"--device cuda without a driver exited {proc.returncode}; no line named libcuda.so.1"
        )
    return last


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
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "reference-onnx")
    parser.add_argument("--suite", default="bookworm", help="Debian suite of the base")
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument(
        "--flavours", default=",".join(FLAVOURS), help="images to build and test: cpu,gpu"
    )
    args = parser.parse_args(argv)
    flavours = [f for f in args.flavours.split(",") if f]
    if not flavours or set(flavours) - set(FLAVOURS):
        print(f"image-test: --flavours takes {', '.join(FLAVOURS)}", file=sys.stderr)
        return 2
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    wheelhouses = {f: ROOT / ".cache" / f"wheelhouse-{f}" for f in flavours}
    needed = [(args.model, "make model")]
    needed += [(w, f"make wheelhouse IMAGE={f}") for f, w in wheelhouses.items()]
    for path, how in needed:
        if not path.is_dir():
            print(f"image-test: {path} is missing: run {how}", file=sys.stderr)
            return 2
    ensure_tools()
    ensure_base(work, args.suite)
    kafka_sh = ROOT / "deploy" / "local" / "kafka.sh"
    kafka_dir = work / "kafka"
    port, controller = free_port(), free_port()
    start = ["bash", str(kafka_sh), "start", "--port", str(port)]
    start += ["--controller-port", str(controller), "--data-dir", str(kafka_dir)]
    run([*start, "--initial-rebalance-delay-ms", "0"])
    bootstrap = f"127.0.0.1:{port}"
    report: dict[str, Any] = {"base": BASE_IMAGE, "images": {}}
    try:
        for flavour in flavours:
            image = image_name(flavour)
            build_s = build(flavour, wheelhouses[flavour].resolve(), args.model.resolve())
            entry: dict[str, Any] = {
                "image": image,
                "size_mb": round(image_size_bytes(image) / 1e6, 1),
                "build_s": round(build_s, 1),
            }
            # The GPU image defaults to --device cuda; with no GPU here, auto falls back.
            env = {"MMSTREAM_DEVICE": "auto"} if flavour == "gpu" else {}
            entry.update(test_image(work, image, args.events, bootstrap, env))
            if flavour == "gpu":
                if "CUDAExecutionProvider" not in entry["provider_line"]:
                    raise ImageTestError(
                        f"the GPU image's worker did not ask for CUDA: {entry['provider_line']!r}"
                    )
                entry["device_cuda_error"] = cuda_without_driver_fails(work, image, bootstrap)
            report["images"][flavour] = entry
            print(f"image-test: {flavour}: {json.dumps(entry)}", flush=True)
    except ImageTestError as exc:
        print(f"image-test: {exc}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["bash", str(kafka_sh), "stop", "--data-dir", str(kafka_dir)])
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for flavour, e in report["images"].items():
        print(
            f"image-test: ok: {e['image']} ({e['size_mb']} MB, built in {e['build_s']} s) "
            f"predicted {e['predicted']}/{e['events']} events as uid {e['uid']} "
            f"({e['root']} root), ready {e['ready_s']} s after start, drained with exit 0 "
            "on SIGTERM"
            + (f"; --device cuda: {e['device_cuda_error']}" if flavour == "gpu" else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
