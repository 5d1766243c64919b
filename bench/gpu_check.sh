#!/usr/bin/env bash
# The GPU check: Genstruct-7B's shape on one NVIDIA GPU, the engine against llama-server, in
# one command, on a machine with no network, from the folder bench/gpu_stage.py fills.
#
#   make gpu-stage ARGS="--cuda-arch 90"      # where the registries are (nvcc: a prebuilt)
#   bash bench/gpu_check.sh                   # on the GPU machine; results in $OUT
#   GPU_CHECK_CPU=1 GPU_CHECK_MODEL=synthetic:tiny bash bench/gpu_check.sh   # the rehearsal
#
# It runs under the machine's own python (no venv, no package index): the staged wheels go
# into a folder first on PYTHONPATH. It makes ONE CMake build of llama.cpp (shared libraries
# and llama-server, every core, the detected compute capability only; bench/gpu_build.py),
# or unpacks the staged one of the same key; the bindings and llama-server both run those
# files. The Genstruct-7B-shaped model is written while it compiles. Then, all layers on the
# GPU and flash attention on, one system after the other: the engine at each level of
# documents in flight, llama-server at the same levels, the engine's step profile,
# speculation `always` against `off` at 1 in flight, and the cost of verifying a draft.
# A step that would end past the time budget is skipped, and the log says so.
#
# What comes back (at most 8 files, in $OUT): gpu_check.log, machine.json (GPU, driver,
# CPU, build and stage), results.json (every record, the step times, skipped steps) and
# nvidia-smi.csv (memory and load, sampled each second). Step outputs stay in the work folder.
#
# Settings (environment; defaults in brackets, the CPU form's after a slash):
#   GPU_CHECK_CPU=1         the CPU form: no nvidia-smi, no CUDA, 0 layers offloaded
#   GPU_CHECK_DRY_RUN=1     check the machine and the stage, print the plan, run nothing
#   GPU_CHECK_STAGE         the staged folder [bench/.build/gpu-stage]
#   GPU_CHECK_PYTHON        the interpreter [python3]
#   GPU_CHECK_WORK          the work folder [bench/.build/gpu-check]
#   GPU_CHECK_BUILDS        where builds are kept, one folder per key
#                           [~/.cache/genstruct-grpc/gpu-check]: a rerun compiles nothing
#   GPU_CHECK_OUT           the results folder [$OUT if set, else bench/results/gpu-check-<UTC>]
#   GPU_CHECK_BUDGET_S      seconds from the start after which no step may end [480 / 1800]
#   GPU_CHECK_MODEL         synthetic, synthetic:N, synthetic:tiny or a GGUF path [synthetic]
#   GPU_CHECK_LEVELS        documents in flight [1,8,32,64]
#   GPU_CHECK_MAX_TOKENS    tokens per generation [128]
#   GPU_CHECK_PROFILE_LEVELS the step profiles: documents in flight [1,32,64]
#   GPU_CHECK_ROUNDS        rounds of the throughput table, the later ones while time is left [3]
#   GPU_CHECK_THREADS       CPU threads [nproc]
#   GPU_CHECK_NVIDIA_SMI    the nvidia-smi command [nvidia-smi]

set -euo pipefail

T0=$(date +%s)
STEP="preflight"
LOG=""
BACKGROUND=()
STEPS=()  # name=status:seconds, for results.json

log() { printf '%s [%4ds] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'gpu_check: error: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - T0 )); }

on_exit() {
    local rc=$? pid
    for pid in "${BACKGROUND[@]}"; do kill "$pid" 2>/dev/null || true; done
    if (( rc != 0 )); then
        printf 'gpu_check: FAILED (exit %d) in step %s after %ds%s\n' "$rc" "$STEP" \
            "$(elapsed)" "${LOG:+; log: $LOG}" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

absolute() { if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ------------------------------------------------------------------------ settings

CPU_MODE=0
[[ ${GPU_CHECK_CPU:-0} != 0 && -n ${GPU_CHECK_CPU:-} ]] && CPU_MODE=1
DRY_RUN=0
[[ ${GPU_CHECK_DRY_RUN:-0} != 0 && -n ${GPU_CHECK_DRY_RUN:-} ]] && DRY_RUN=1
NVIDIA_SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
PY=${GPU_CHECK_PYTHON:-python3}
STAGE=$(absolute "${GPU_CHECK_STAGE:-$ROOT/bench/.build/gpu-stage}")
WORK=$(absolute "${GPU_CHECK_WORK:-$ROOT/bench/.build/gpu-check}")
RESULTS=$(absolute "${GPU_CHECK_OUT:-${OUT:-$ROOT/bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}")
MODEL=${GPU_CHECK_MODEL:-synthetic}
LEVELS=${GPU_CHECK_LEVELS:-1,8,32,64}
MAX_TOKENS=${GPU_CHECK_MAX_TOKENS:-128}
PROFILE_LEVELS=${GPU_CHECK_PROFILE_LEVELS:-1,32,64}
ROUNDS=${GPU_CHECK_ROUNDS:-3}
NPROC=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
THREADS=${GPU_CHECK_THREADS:-$NPROC}
if (( CPU_MODE )); then
    BUDGET=${GPU_CHECK_BUDGET_S:-1800}; N_GPU_LAYERS=0; FLASH_ATTN=auto
else
    BUDGET=${GPU_CHECK_BUDGET_S:-480}; N_GPU_LAYERS=-1; FLASH_ATTN=on
fi
SITE="$WORK/site"

# Nothing may reach for the network: pip finds no index, the Hub is offline.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The staged packages first, then the project's sources (no install), then the image's own.
export PYTHONPATH="$SITE:$ROOT/service:$ROOT/client:$ROOT"

# ------------------------------------------------------------------------ preflight

GPU_CSV=""
CUDA_ARCH=""
if (( ! CPU_MODE )); then
    command -v "$NVIDIA_SMI" >/dev/null 2>&1 \
        || die "nvidia-smi not found (GPU_CHECK_NVIDIA_SMI=$NVIDIA_SMI): the GPU form needs" \
            "an NVIDIA driver; GPU_CHECK_CPU=1 runs the CPU form"
    "$NVIDIA_SMI" -L >/dev/null 2>&1 || die "'$NVIDIA_SMI -L' failed: no GPU visible"
    CAP=$("$NVIDIA_SMI" --query-gpu=compute_cap --format=csv,noheader | head -n1 \
        | tr -d '[:space:]') || true
    [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]] || die "nvidia-smi gave no compute capability ('$CAP')"
    CUDA_ARCH=${CAP/./}
    GPU_CSV=$("$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total,compute_cap \
        --format=csv,noheader)
    [[ -x /usr/local/cuda/bin/nvcc ]] && export PATH="$PATH:/usr/local/cuda/bin"
fi

# Where the CUDA runtime and cuBLAS are, when the loader does not know: the toolkit's folders
# and the python's nvidia-* wheels (a PyTorch image has them there).
cuda_library_path() {
    ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.' && return 0
    local dir purelib
    purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) \
        || true
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib ${purelib:+$purelib/nvidia/*/lib}; do
        compgen -G "$dir/libcu*.so.*" >/dev/null && printf '%s:' "$dir"
    done
    return 0
}
if (( ! CPU_MODE )); then
    export LD_LIBRARY_PATH="$(cuda_library_path)${LD_LIBRARY_PATH:-}"
fi
[[ -f $STAGE/requirements.txt && -f $STAGE/llama.cpp.tar.xz && -d $STAGE/wheels ]] \
    || die "no stage in $STAGE: run 'make gpu-stage' (python -m bench.gpu_stage) where the" \
        "package registries can be reached, and carry that folder here"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$PY is missing or older than Python 3.10 (set GPU_CHECK_PYTHON)"
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$STAGE/requirements.txt")
[[ -n $VERSION ]] || die "$STAGE/requirements.txt pins no llama-cpp-python"
BUILDS=$(absolute "${GPU_CHECK_BUILDS:-$("$PY" -m bench.gpu_build builds)}")
KEY=$("$PY" -m bench.gpu_build key --version "$VERSION" ${CUDA_ARCH:+--cuda-arch "$CUDA_ARCH"})
BUILD_DIR="$BUILDS/build-$KEY"
PREBUILT="$STAGE/llama-$KEY.tar.xz"

# Every benchmark's llama.cpp settings (bench/settings.py), the model's path after it.
SETTINGS=(--n-gpu-layers "$N_GPU_LAYERS" --threads "$THREADS" --n-batch 2048 --n-ubatch 512
          --flash-attn "$FLASH_ATTN")
log "${GPU_CSV:-CPU form (GPU_CHECK_CPU=1)}; llama-cpp-python $VERSION, build $KEY" \
    "(${CUDA_ARCH:+CUDA architecture $CUDA_ARCH only, }$( [[ -f $PREBUILT ]] \
    && echo "staged prebuilt" || echo "compiled here"))"
log "stage $STAGE; work $WORK; results $RESULTS; budget ${BUDGET}s; levels $LEVELS;" \
    "$MAX_TOKENS tokens; model $MODEL; settings ${SETTINGS[*]}"
if (( DRY_RUN )); then
    log "dry run (GPU_CHECK_DRY_RUN=1): nothing installed, built or measured"
    exit 0
fi

cd "$ROOT"
mkdir -p "$WORK" "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

# A step of the plan: run it only if its estimate ends within the budget, record how it went.
# The estimates are deliberately high; a skipped step is named in the log and results.json.
guarded() {
    local name=$1 estimate=$2 start rc=0
    shift 2
    if (( $(elapsed) + estimate > BUDGET )); then
        log "== step $name skipped: it would end past the budget (about ${estimate}s," \
            "$(( BUDGET - $(elapsed) ))s left)"
        STEPS+=("$name=skipped:0")
        return 0
    fi
    STEP=$name
    start=$(date +%s)
    log "== step $name"
    "$@" || rc=$?
    if (( rc == 0 )); then
        STEPS+=("$name=done:$(( $(date +%s) - start ))")
    else
        log "== step $name FAILED (exit $rc); the check goes on"
        STEPS+=("$name=failed:$(( $(date +%s) - start ))")
    fi
}

# ------------------------------------------------------------------------ 1. the packages

STEP="packages"
log "== step packages: the staged wheels into $SITE"
rm -rf "$SITE"
"$PY" -m pip install --quiet --no-deps --no-compile --find-links "$STAGE/wheels" \
    --target "$SITE" -r "$STAGE/requirements.txt"

# ------------------------------------------------------------------------ 3. the model
# Written in the background while llama.cpp compiles (a single core, mostly disk writes).

SYNTHETIC=()
case "$MODEL" in
    synthetic) ;;
    synthetic:tiny) SYNTHETIC=(--tiny) ;;
    synthetic:*) SYNTHETIC=(--layers "${MODEL#synthetic:}") ;;
    *) SYNTHETIC=(none) ;;
esac
MODEL_PID=""
if [[ ${SYNTHETIC[0]:-} != none ]]; then
    mkdir -p bench/.build/tokenizer
    cp "$STAGE"/tokenizer/* bench/.build/tokenizer/
    "$PY" -m bench.synthetic_model "${SYNTHETIC[@]}" >"$WORK/model.path" 2>"$WORK/model.log" &
    MODEL_PID=$!
    BACKGROUND+=("$MODEL_PID")
    log "writing the model in the background: python -m bench.synthetic_model ${SYNTHETIC[*]}"
fi

# ------------------------------------------------------------------------ 2. the one build

STEP="build"
build_from_source() {  # the source beside its build, so that a rerun recompiles nothing
    log "compiling llama.cpp ($NPROC jobs) into $BUILD_DIR"
    if [[ ! -f $BUILD_DIR.src/llama.cpp/CMakeLists.txt ]]; then
        rm -rf "$BUILD_DIR.src"
        mkdir -p "$BUILD_DIR.src"
        tar -xJf "$STAGE/llama.cpp.tar.xz" -C "$BUILD_DIR.src"
    fi
    "$PY" -m bench.gpu_build build --source "$BUILD_DIR.src/llama.cpp" --build-dir "$BUILD_DIR" \
        --version "$VERSION" ${CUDA_ARCH:+--cuda-arch "$CUDA_ARCH"} --jobs "$NPROC"
}
# The build report (GetModelInfo.build): the backends and devices llama.cpp sees.
report() {
    "$PY" -c 'import sys; from genstruct_service.cli import main; sys.exit(main(["--version"]))'
}
usable() {  # the GPU form needs CUDA with the GPU as a device
    (( CPU_MODE )) || { grep -q 'backends[^;]*CUDA' <<<"$1" && grep -q '(GPU)' <<<"$1"; }
}
BUILT_FROM=cache
BUILD_T0=$(date +%s)
if [[ -f $PREBUILT && ! -f $BUILD_DIR/bin/llama-build.json ]]; then
    log "== step build: the staged build $KEY"
    "$PY" -m bench.gpu_build unpack --archive "$PREBUILT" --build-dir "$BUILD_DIR"
    BUILT_FROM=stage
elif [[ -f $BUILD_DIR/bin/llama-build.json ]]; then
    log "== step build: reusing $BUILD_DIR"
else
    log "== step build"
    build_from_source
    BUILT_FROM=source
fi
"$PY" -m bench.gpu_build install --build-dir "$BUILD_DIR" --site "$SITE" >/dev/null
BUILD_REPORT=$(report 2>&1) || true
if ! usable "$BUILD_REPORT" && [[ $BUILT_FROM == stage ]]; then
    printf '%s\n' "$BUILD_REPORT"
    log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}; unresolved libraries:"
    ldd "$SITE"/llama_cpp/lib/libggml-*.so 2>&1 | grep -i 'not found' || true
    log "the staged build does not run here; compiling the same flags from the source"
    rm -rf "$BUILD_DIR"
    build_from_source
    BUILT_FROM=source
    "$PY" -m bench.gpu_build install --build-dir "$BUILD_DIR" --site "$SITE" >/dev/null
    BUILD_REPORT=$(report 2>&1) || true
fi
printf '%s\n' "$BUILD_REPORT"
grep -q '^llama.cpp: ' <<<"$BUILD_REPORT" || die "the build report failed (above)"
usable "$BUILD_REPORT" || die "llama.cpp has no CUDA backend with a GPU device (report above)"
STEPS+=("build=done:$(( $(date +%s) - BUILD_T0 ))")
export GENSTRUCT_LLAMA_SERVER="$BUILD_DIR/bin/llama-server"

STEP="model"
if [[ -n $MODEL_PID ]]; then
    wait "$MODEL_PID" || { cat "$WORK/model.log" >&2; die "the synthetic model was not written"; }
    MODEL_PATH=$(tail -n1 "$WORK/model.path")
else
    MODEL_PATH=$MODEL
fi
log "model: $MODEL_PATH ($(du -h "$MODEL_PATH" | cut -f1)); $(elapsed)s so far"
COMMON=(--model "$MODEL_PATH" "${SETTINGS[@]}")

# ------------------------------------------------------------------------ machine.json

export GC_GPU_CSV="$GPU_CSV" GC_CUDA_ARCH="$CUDA_ARCH" GC_BUILD_REPORT="$BUILD_REPORT"
export GC_BUILD_DIR="$BUILD_DIR" GC_BUILT_FROM="$BUILT_FROM" GC_STAGE="$STAGE"
export GC_MODEL="$MODEL" GC_MODEL_PATH="$MODEL_PATH" GC_NPROC="$NPROC"
"$PY" - "$RESULTS/machine.json" <<'PY'
import json, os, platform, subprocess, sys, time
from pathlib import Path

env = os.environ.get
gpus = []
for line in filter(None, env("GC_GPU_CSV", "").splitlines()):
    name, driver, memory, cap = (part.strip() for part in line.rsplit(",", 3))
    gpus.append({"name": name, "driver_version": driver, "memory_total": memory,
                 "compute_cap": cap})
cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")), "")
def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
model = Path(env("GC_MODEL_PATH", ""))
machine = {
    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "mode": "gpu" if gpus else "cpu",
    "gpus": gpus,
    "cuda_architecture": env("GC_CUDA_ARCH") or None,
    "nproc": int(env("GC_NPROC")),
    "cpu": cpu,
    "kernel": platform.platform(),
    "python": platform.python_version(),
    "build": read(Path(env("GC_BUILD_DIR")) / "bin" / "llama-build.json"),
    "built_from": env("GC_BUILT_FROM"),
    "build_report": env("GC_BUILD_REPORT"),
    "stage": read(Path(env("GC_STAGE")) / "manifest.json"),
    "model": env("GC_MODEL"),
    "model_bytes": model.stat().st_size if model.is_file() else None,
}
Path(sys.argv[1]).write_text(json.dumps(machine, indent=2) + "\n")
PY
log "wrote $RESULTS/machine.json"

# ------------------------------------------------------------------------ 4. the measurements

if (( ! CPU_MODE )); then
    "$NVIDIA_SMI" --query-gpu=timestamp,memory.used,utilization.gpu,power.draw,clocks.sm \
        --format=csv -l 1 >"$RESULTS/nvidia-smi.csv" 2>/dev/null &
    BACKGROUND+=("$!")
fi

IFS=, read -r -a LEVEL_LIST <<<"$LEVELS"
throughput() {  # system level round
    local docs=$(( 2 * $2 > 8 ? 2 * $2 : 8 ))
    "$PY" -m bench.throughput "${COMMON[@]}" --systems "$1" --scenarios "c$2n1" \
        --docs "$docs" --max-tokens "$MAX_TOKENS" --out "$WORK/throughput-$1-c$2-r$3.json"
}
rm -f "$WORK"/throughput-*.json "$WORK"/step_profile-*.json "$WORK"/speculation.json \
    "$WORK"/verify_cost.txt "$WORK"/verify_cost.json
# The engine at every level first, so a later failure still leaves its figures.
for level in "${LEVEL_LIST[@]}"; do guarded "engine-c$level" 45 throughput engine "$level" 1; done
for level in "${LEVEL_LIST[@]}"; do guarded "server-c$level" 45 throughput server "$level" 1; done
profile() {  # level
    "$PY" -m bench.step_profile "${COMMON[@]}" --in-flight "$1" --docs $(( $1 < 4 ? 4 : 2 * $1 )) \
        --max-tokens "$MAX_TOKENS" >"$WORK/step_profile-c$1.json"
}
IFS=, read -r -a PROFILE_LIST <<<"$PROFILE_LEVELS"
for level in "${PROFILE_LIST[@]}"; do guarded "step-profile-c$level" 50 profile "$level"; done
# Random weights accept almost no draft: this is what speculation costs at worst.
guarded speculation 70 "$PY" -m bench.speculation "${COMMON[@]}" --levels 1 --docs 4 \
    --max-tokens "$MAX_TOKENS" --repeat 1 --engine-modes off,always --server-specs "" \
    --out "$WORK/speculation.json"
# The step time by rows also as JSON, to price drafts on it (bench.draft_replay --price-with).
verify_cost() {
    "$PY" -m bench.verify_cost "${COMMON[@]}" --drafts 1,2,3,4,5,6,7,8,11,15,16 \
        --out "$WORK/verify_cost.json" >"$WORK/verify_cost.txt"
}
guarded verify-cost 40 verify_cost
# More rounds while time is left, each peer beside the other at each level: the table gives
# the median run of each.
for (( round = 2; round <= ROUNDS; round++ )); do
    for level in "${LEVEL_LIST[@]}"; do
        guarded "engine-c$level-r$round" 45 throughput engine "$level" "$round"
        guarded "server-c$level-r$round" 45 throughput server "$level" "$round"
    done
done

# ------------------------------------------------------------------------ 5. results.json

STEP="results"
"$PY" - "$WORK" "$RESULTS/results.json" "$(elapsed)" "${STEPS[@]}" <<'PY'
import json, sys
from pathlib import Path

work, target, total, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def read(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None
throughput = [r for f in sorted(work.glob("throughput-*.json")) for r in read(f.name) or []]
cost = work / "verify_cost.txt"
results = {
    "throughput": throughput,
    "step_profile": [read(f.name) for f in sorted(work.glob("step_profile-c*.json"),
                                                   key=lambda f: int(f.stem.split("-c")[1]))],
    "speculation": read("speculation.json"),
    "verify_cost": cost.read_text().splitlines() if cost.exists() else None,
    "verify_cost_seconds": read("verify_cost.json"),
    "steps": {name: {"status": value.split(":")[0], "seconds": int(value.split(":")[1])}
              for name, value in (s.split("=", 1) for s in steps)},
    "total_seconds": total,
}
target.write_text(json.dumps(results, indent=2) + "\n")

def gib(b):
    return f"{b / 2**30:.1f}" if b else "-"
runs = {}
for r in throughput:
    runs.setdefault((r["system"], r["concurrency"]), []).append(r)
def median(system, level):
    """The median run (the lower middle one when even) and the number of runs."""
    found = sorted(runs.get((system, level), []), key=lambda r: r["tokens_per_second"])
    return (found[(len(found) - 1) // 2], len(found)) if found else (None, 0)
print(f"{'in flight':>9} {'engine tok/s':>13} {'server tok/s':>13} {'ratio':>7} "
      f"{'engine GiB':>11} {'server GiB':>11}  runs")
for level in sorted({r["concurrency"] for r in throughput}):
    (e, ne), (s, ns) = median("engine", level), median("llama-server", level)
    ratio = f"{e['tokens_per_second'] / s['tokens_per_second']:.2f}x" if e and s else "-"
    print(f"{level:>9} {e['tokens_per_second'] if e else 0:>13.1f} "
          f"{s['tokens_per_second'] if s else 0:>13.1f} {ratio:>7} "
          f"{gib(e and e.get('peak_gpu_memory_bytes')):>11} "
          f"{gib(s and s.get('peak_gpu_memory_bytes')):>11}  {ne}/{ns}")
skipped = [n for n, v in results["steps"].items() if v["status"] != "done"]
print("steps not done: " + (", ".join(skipped) if skipped else "none"))
PY
log "done in $(elapsed)s: $RESULTS ($(ls "$RESULTS" | tr '\n' ' '))"
(( $(ls "$RESULTS" | wc -l) <= 8 )) || die "more than 8 files in $RESULTS"
