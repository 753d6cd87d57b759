#!/usr/bin/env bash
# mmstream on a GPU machine in one call: raw ONNX Runtime CUDA throughput with and without IO
# binding, and `mmstream bench --device cuda` end to end when Java and the Kafka jars are there.
# deploy/gpu/README.md says how to prepare the call (wheels, parts, models) and how to make it.
#
#   bash deploy/gpu/bench-gpu.sh [--model DIR]... [--sizes 1,8,32,128,512] [--seconds S]
#                                [--allow-cpu] [--quick] [--no-e2e] [--dry-run]
#   bash deploy/gpu/bench-gpu.sh --stage             a staging call: keep the carried wheel parts
#   bash deploy/gpu/bench-gpu.sh --split-wheel FILE  here, beforehand: cut FILE into .whlparts/
#
# --allow-cpu  run on CPUExecutionProvider when there is no onnxruntime-gpu or no working CUDA
#              (a test of this script on a machine without a GPU; never on the device)
# --quick      batch sizes 1,8 and 0.3 s per point
# --dry-run    say what would be done (ORT found? wheels and parts complete? e2e possible?) and
#              stop before installing or measuring; exits as the real run would at that point
#
# Writes to $OUT (default .cache/gpu-bench): bench-gpu.log, nvidia-smi.txt, gpu-bench.json,
# gpu-bench.md and, end to end, e2e/bench.{json,md,png}. Stays within BUDGET_S (default 450 s).
# Exit: 0 done; 2 usage; 3 no onnxruntime-gpu; 4 CUDA does not initialise; 5 raw benchmark
# failed; 6 end to end failed.
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO_ROOT" || exit 2

PY=${PYTHON:-python3}
OUT=${OUT:-$REPO_ROOT/.cache/gpu-bench}
# Carried wheels (*.whl) and wheel parts: .cache/ is git-ignored already, .whl/ and .whlparts/
# are where the device README puts them (ignore them in .git/info/exclude if you use them).
read -r -a WHL_DIRS <<<"${GPU_BENCH_WHL_DIRS:-.cache/gpu/whl .whl}"
read -r -a PARTS_DIRS <<<"${GPU_BENCH_PARTS_DIRS:-.cache/gpu/whlparts .whlparts}"
PARTS_DIR=${PARTS_DIRS[0]} # where --split-wheel writes
STAGE_DIR=${GPU_BENCH_STAGE_DIR:-/tmp/mmstream-stage}
SITE_DIR=${GPU_BENCH_SITE:-/tmp/site}
PART_SIZE=${PART_SIZE:-61M}
BUDGET_S=${BUDGET_S:-450}
E2E_EVENTS=${E2E_EVENTS:-1000}
KAFKA_PORT=${KAFKA_PORT:-19092}
KAFKA_DATA=${KAFKA_DATA:-/tmp/mmstream-kafka}
GPU_PRELOAD=auto

MODELS=()
SIZES=1,8,32,128,512
SECS=1.0
ALLOW_CPU=0
DRY=0
E2E=1
MODE=run
SPLIT_FILE=

log() { echo "[bench-gpu +${SECONDS}s] $*"; }
die() {
    local code=$1
    shift
    echo "[bench-gpu +${SECONDS}s] STOP (exit $code): $*" >&2
    exit "$code"
}
usage() {
    sed -n '5,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --model) MODELS+=("${2:?--model needs a directory}") && shift ;;
        --sizes) SIZES=${2:?--sizes needs a list} && shift ;;
        --seconds) SECS=${2:?--seconds needs a number} && shift ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        --quick) SIZES=1,8 && SECS=0.3 ;;
        --no-e2e) E2E=0 ;;
        --dry-run) DRY=1 ;;
        --stage) MODE=stage ;;
        --split-wheel) MODE=split && SPLIT_FILE=${2:?--split-wheel needs a wheel file} && shift ;;
        -h | --help) usage ;;
        *) echo "bench-gpu: unknown argument $1" >&2 && usage ;;
    esac
    shift
done

# --- wheel parts ------------------------------------------------------------------------------
# A wheel over the 64 MiB a call carries travels as NAME.part-NN files (PART_SIZE each) plus
# NAME.sha256 ("<sha256>  NAME", then "# parts N"), over several calls of one warm machine.

split_wheel() {
    local file=$1 name
    [[ -f $file ]] || die 2 "no such file: $file"
    name=$(basename "$file")
    mkdir -p "$PARTS_DIR"
    rm -f "$PARTS_DIR/$name".part-* "$PARTS_DIR/$name.sha256"
    split -b "$PART_SIZE" -d -a 2 "$file" "$PARTS_DIR/$name.part-"
    local parts=("$PARTS_DIR/$name".part-*)
    {
        echo "$(sha256sum "$file" | cut -d' ' -f1)  $name"
        echo "# parts ${#parts[@]}"
    } >"$PARTS_DIR/$name.sha256"
    ls -l "$PARTS_DIR/$name".*
    echo "carry in the staging calls, one part each (the .sha256 with the first):"
    printf '  %s\n' "${parts[@]}"
}

# Every part file, staged copy first, by name: "name<TAB>path" lines.
part_paths() {
    local want=$1 d f seen=" "
    for f in $(for d in "$STAGE_DIR" "${PARTS_DIRS[@]}"; do ls -d "$d/$want".part-* 2>/dev/null; done); do
        [[ -f $f ]] || continue
        [[ $seen == *" $(basename "$f") "* ]] && continue
        seen+="$(basename "$f") "
        printf '%s\t%s\n' "$(basename "$f")" "$f"
    done | sort
}

# The wheels that travel in parts (names of their .sha256 files, staged or carried).
parted_wheels() {
    local d f
    for d in "$STAGE_DIR" "${PARTS_DIRS[@]}"; do
        for f in "$d"/*.whl.sha256; do
            [[ -f $f ]] && basename "$f" .sha256
        done
    done | sort -u
}

sha_file() {
    local d
    for d in "$STAGE_DIR" "${PARTS_DIRS[@]}"; do
        [[ -f $d/$1.sha256 ]] && echo "$d/$1.sha256" && return
    done
}

# Check (and unless $2 = check, write to $STAGE_DIR/whl/) one parted wheel; 0 when complete.
assemble() {
    local name=$1 how=${2:-write} shafile want count got paths
    shafile=$(sha_file "$name")
    want=$(awk 'NR == 1 {print $1}' "$shafile")
    count=$(awk '$1 == "#" && $2 == "parts" {print $3}' "$shafile")
    mapfile -t paths < <(part_paths "$name" | cut -f2)
    log "$name: ${#paths[@]} of ${count:-?} parts here ($(part_paths "$name" | cut -f1 | sed 's/.*part-//' | tr '\n' ' '))"
    if [[ -n $count && ${#paths[@]} -ne $count ]]; then
        log "$name: incomplete; the missing parts went back with an earlier machine, or were never carried"
        return 1
    fi
    [[ ${#paths[@]} -gt 0 ]] || return 1
    if [[ $how == check ]]; then
        got=$(cat "${paths[@]}" | sha256sum | cut -d' ' -f1)
    else
        mkdir -p "$STAGE_DIR/whl"
        cat "${paths[@]}" >"$STAGE_DIR/whl/$name.tmp" || return 1
        got=$(sha256sum "$STAGE_DIR/whl/$name.tmp" | cut -d' ' -f1)
    fi
    if [[ $got != "$want" ]]; then
        log "$name: sha256 $got, expected $want: a part is damaged or from another wheel"
        rm -f "$STAGE_DIR/whl/$name.tmp"
        return 1
    fi
    [[ $how == check ]] || mv "$STAGE_DIR/whl/$name.tmp" "$STAGE_DIR/whl/$name"
    log "$name: complete, sha256 ok"
}

stage() {
    mkdir -p "$STAGE_DIR"
    local d f n=0
    for d in "${PARTS_DIRS[@]}"; do
        for f in "$d"/*; do
            [[ -f $f ]] || continue
            cp -f "$f" "$STAGE_DIR/" && n=$((n + 1))
        done
    done
    log "staged $n carried file(s) into $STAGE_DIR (kept while this machine stays warm)"
    local name
    while read -r name; do
        [[ -n $name ]] && assemble "$name" check
    done < <(parted_wheels)
    df -h "$STAGE_DIR" | tail -1
    return 0
}

# --- environment ------------------------------------------------------------------------------

ort_has_cuda() {
    "$PY" -c 'import sys, onnxruntime as o; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null
}

ort_where() {
    "$PY" -c 'import onnxruntime as o; print(o.__version__, o.get_device(), o.get_available_providers(), o.__file__)' 2>&1 | tail -1
}

# Folders of the CUDA/cuDNN shared libraries that the nvidia-* wheels installed.
nvidia_lib_dirs() {
    "$PY" - <<'EOF' 2>/dev/null
import glob, os, sys
dirs = []
for root in sys.path:
    base = os.path.join(root or ".", "nvidia")
    if not os.path.isdir(base):
        continue
    for d in sorted(glob.glob(os.path.join(base, "**", "lib"), recursive=True)):
        if glob.glob(os.path.join(d, "*.so*")) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
}

# worker.cli's main, with the CUDA libraries preloaded as the probe found they must be:
# "${MMSTREAM_CLI[@]}" ARGS... (an array, so that `timeout` can run it).
MMSTREAM_CLI=("$PY" -c 'import runpy, sys; sys.path.insert(0, "deploy/gpu"); import gpu_bench; how = sys.argv.pop(1); how == "none" or gpu_bench.preload(how); sys.argv[0] = "mmstream"; runpy.run_module("worker.cli", run_name="__main__")')

kafka_version() {
    sed -n 's/^KAFKA_VERSION=\([0-9.]*\).*/\1/p' deploy/local/kafka.sh
}

# Why end to end cannot run here ("" when it can).
e2e_blocker() {
    local java=${JAVA_HOME:+$JAVA_HOME/bin/}java cache jar
    cache=${MMSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmstream}
    jar=$cache/kafka-jars-$(kafka_version)/kafka_2.13-$(kafka_version).jar
    [[ $E2E -eq 1 ]] || { echo "--no-e2e"; return; }
    command -v "$java" >/dev/null || { echo "no java on this machine (JAVA_HOME unset, none on PATH)"; return; }
    [[ -f $jar ]] || { echo "no Kafka jars at $jar (set MMSTREAM_CACHE_DIR)"; return; }
    "$PY" -c 'import kafka' 2>/dev/null || { echo "kafka-python does not import (carry its wheel in .whl/)"; return; }
    echo ""
}

# --- the run ----------------------------------------------------------------------------------

main() {
    log "mmstream GPU benchmark in $REPO_ROOT; out $OUT; python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
    log "$(uname -srm); $(nproc) CPUs; budget ${BUDGET_S} s$([[ $DRY -eq 1 ]] && echo '; DRY RUN')"

    if command -v nvidia-smi >/dev/null; then
        nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
    else
        log "no nvidia-smi here: no NVIDIA driver (a CPU machine)" | tee "$OUT/nvidia-smi.txt"
    fi

    if [[ ${#MODELS[@]} -eq 0 ]]; then
        local d
        for d in .cache/reference-onnx-256 .cache/reference-onnx; do
            [[ -f $d/manifest.json ]] && MODELS+=("$d")
        done
    fi
    [[ ${#MODELS[@]} -gt 0 ]] || die 2 "no model directory (carry .cache/reference-onnx[-256], or --model DIR)"
    log "models: ${MODELS[*]}"

    # onnxruntime-gpu: already importable, or installed from carried wheels and parts; the
    # other carried wheels (kafka-python, crc32c) are installed in any case.
    local device=cuda wheels=() name d has_cuda=0
    if ort_has_cuda; then
        has_cuda=1
        log "onnxruntime with CUDA already imports: $(ort_where)"
    else
        log "this python's onnxruntime has no CUDAExecutionProvider: $(ort_where)"
        while read -r name; do
            [[ -n $name ]] || continue
            if [[ $DRY -eq 1 ]]; then
                assemble "$name" check && wheels+=("$STAGE_DIR/whl/$name")
            else
                assemble "$name" && wheels+=("$STAGE_DIR/whl/$name")
            fi
        done < <(parted_wheels)
    fi
    for d in "${WHL_DIRS[@]}"; do
        for name in "$d"/*.whl; do
            [[ -f $name ]] || continue
            [[ $has_cuda -eq 1 && $(basename "$name") == onnxruntime* ]] && continue
            wheels+=("$name")
        done
    done
    log "wheels to install: ${wheels[*]:-none}"
    if [[ ${#wheels[@]} -gt 0 && $DRY -eq 1 ]]; then
        log "dry run: would install those into $SITE_DIR and put it first on PYTHONPATH"
    elif [[ ${#wheels[@]} -gt 0 ]]; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE_DIR" "${wheels[@]}"; then
            export PYTHONPATH=$SITE_DIR:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}
            log "installed into $SITE_DIR: $(ls "$SITE_DIR" | grep -ci dist-info) distributions"
        elif [[ $ALLOW_CPU -eq 1 ]]; then
            log "pip could not install them (wheels for another Python?); --allow-cpu: going on without"
        else
            die 3 "pip could not install ${wheels[*]}"
        fi
    fi
    if [[ $has_cuda -eq 0 ]]; then
        if [[ $DRY -eq 1 ]]; then
            printf '%s\n' "${wheels[@]}" | grep -q 'onnxruntime_gpu-' || device=none
        elif ! ort_has_cuda; then
            device=none
        else
            log "onnxruntime now: $(ort_where)"
        fi
    fi
    if [[ $device == none ]]; then
        [[ $ALLOW_CPU -eq 1 ]] || die 3 "onnxruntime-gpu is not installed here and no complete wheel of it came along (onnxruntime_gpu-*.whl in ${WHL_DIRS[*]}, or all its parts in ${PARTS_DIRS[*]} and $STAGE_DIR): CUDA cannot be measured. See deploy/gpu/README.md."
        log "--allow-cpu: no onnxruntime-gpu, measuring CPUExecutionProvider instead"
        device=cpu
    fi
    export PYTHONPATH=${PYTHONPATH:-$REPO_ROOT}
    [[ :$PYTHONPATH: == *":$REPO_ROOT:"* ]] || export PYTHONPATH=$PYTHONPATH:$REPO_ROOT

    if [[ $device == cuda ]]; then
        local libs
        libs=$(nvidia_lib_dirs)
        if [[ -n $libs ]]; then
            export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            log "LD_LIBRARY_PATH += $(echo "$libs" | tr ':' '\n' | wc -l) nvidia-* lib folders"
        else
            log "no nvidia-* wheel libraries found on sys.path"
        fi
        if [[ $DRY -eq 1 ]]; then
            log "dry run: would probe a CUDA session of ${MODELS[0]} (preload auto, then torch)"
        elif "$PY" deploy/gpu/gpu_bench.py --probe --model "${MODELS[0]}" --preload auto; then
            GPU_PRELOAD=auto
        elif "$PY" deploy/gpu/gpu_bench.py --probe --model "${MODELS[0]}" --preload torch; then
            GPU_PRELOAD=torch
            log "CUDA runs once torch has loaded the CUDA libraries: preloading torch"
        elif [[ $ALLOW_CPU -eq 1 ]]; then
            log "--allow-cpu: CUDA does not initialise, measuring CPUExecutionProvider instead"
            device=cpu
        else
            die 4 "onnxruntime-gpu imports but a CUDA session does not run (output above)"
        fi
    fi

    # Optional end-to-end kit, carried under .cache/gpu/: a JRE and the Kafka jars.
    if [[ -z ${JAVA_HOME:-} && -x .cache/gpu/jre/bin/java ]]; then
        export JAVA_HOME=$REPO_ROOT/.cache/gpu/jre
    fi
    if [[ -z ${MMSTREAM_CACHE_DIR:-} && -d .cache/gpu/mmstream-cache ]]; then
        export MMSTREAM_CACHE_DIR=$REPO_ROOT/.cache/gpu/mmstream-cache
    fi
    local blocker
    blocker=$(e2e_blocker)
    if [[ $DRY -eq 1 ]]; then
        log "dry run: would measure raw ORT on $device at batch sizes $SIZES, $SECS s per point"
        log "dry run: end to end ${blocker:+skipped: }${blocker:-would run (mmstream bench --device $device)}"
        return 0
    fi

    # Raw ORT, with and without IO binding.
    local rc=0 left
    left=$((BUDGET_S - SECONDS - 60))
    [[ -z $blocker ]] && left=$((left - 200))
    ((left > 30)) || left=30
    log "raw ORT on $device (at most $left s)"
    local model_args=() m preload=$GPU_PRELOAD
    [[ $device == cuda ]] || preload=none
    for m in "${MODELS[@]}"; do model_args+=(--model "$m"); done
    timeout --kill-after=10 "$left" "$PY" deploy/gpu/gpu_bench.py --device "$device" \
        --preload "$preload" --batch-sizes "$SIZES" --seconds "$SECS" "${model_args[@]}" \
        --json "$OUT/gpu-bench.json" --md "$OUT/gpu-bench.md"
    local raw_rc=$?
    if [[ $raw_rc -ne 0 ]]; then
        log "raw ORT benchmark failed or ran out of time (exit $raw_rc); partial JSON kept if any"
        rc=5
    fi

    # End to end: a local broker, then `mmstream bench` on the largest model.
    local e2e_status
    if [[ -z $blocker ]]; then
        left=$((BUDGET_S - SECONDS - 30))
        if ((left < 120)); then
            e2e_status="skipped: only $left s left"
        else
            log "end to end: Kafka $(kafka_version) on 127.0.0.1:$KAFKA_PORT, mmstream bench (at most $left s)"
            trap 'bash deploy/local/kafka.sh stop --data-dir "$KAFKA_DATA" >/dev/null 2>&1' EXIT
            if bash deploy/local/kafka.sh start --port "$KAFKA_PORT" \
                --controller-port $((KAFKA_PORT + 1)) --data-dir "$KAFKA_DATA"; then
                left=$((BUDGET_S - SECONDS - 20))
                timeout --kill-after=10 "$left" "${MMSTREAM_CLI[@]}" "$preload" \
                    bench --model "${MODELS[0]}" \
                    --bootstrap-servers "127.0.0.1:$KAFKA_PORT" --device "$device" \
                    --events "$E2E_EVENTS" --out "$OUT/e2e"
                local e2e_rc=$?
                e2e_status="ran: exit $e2e_rc (${MODELS[0]}, $E2E_EVENTS events)"
                [[ $e2e_rc -eq 0 || $rc -ne 0 ]] || rc=6
            else
                e2e_status="skipped: the Kafka broker did not start"
            fi
            bash deploy/local/kafka.sh stop --data-dir "$KAFKA_DATA" >/dev/null 2>&1
            trap - EXIT
        fi
    else
        e2e_status="skipped: $blocker"
    fi
    log "end to end: $e2e_status"
    if [[ -f $OUT/gpu-bench.json ]]; then
        "$PY" - "$OUT/gpu-bench.json" "$e2e_status" <<'EOF'
import json, sys
path, status = sys.argv[1], sys.argv[2]
report = json.load(open(path))
report["end_to_end"] = status
json.dump(report, open(path, "w"), indent=2)
EOF
        echo "- end to end: $e2e_status" >>"$OUT/gpu-bench.md"
    fi

    log "done in ${SECONDS} s (exit $rc); files in $OUT:"
    find "$OUT" -type f | sort | sed 's/^/  /'
    return "$rc"
}

case $MODE in
    split) split_wheel "$SPLIT_FILE" ;;
    stage) stage ;;
    run)
        mkdir -p "$OUT" || exit 2
        main 2>&1 | tee -a "$OUT/bench-gpu.log"
        exit "${PIPESTATUS[0]}"
        ;;
esac
