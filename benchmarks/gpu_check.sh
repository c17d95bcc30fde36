#!/usr/bin/env bash
# The GPU run of issues 21 and 30, one script (at most 16.5 minutes by its step limits, two halves: KVCORE_ONLY): install the carried wheels, the
# gpu-marked tests, calibration cost on a ~1B Llama shape and on SmolLM2's shape, decode speed and device memory of
# the low-rank cache at 4k/16k/32k tokens; issue 30: peak memory of a 4k/16k/32k prefill through lm-eval (hf and
# every kvcore_hf mode), the no-mask and offload tests, and data-parallel lm-eval on every GPU present (skipped with
# one). Each step prints its table; the whole log also goes to $OUT/gpu_check.log (the device tool's folder that
# comes back) or runs/gpu_check.log.
#
#   bash scripts/build_gpu_wheelhouse.sh           # here, once: .whl/ with what the GPU image lacks
#   bash benchmarks/gpu_check.sh                   # there (device tool: carry .whl), from the repository root
#   KVCORE_DRY_RUN=1 bash benchmarks/gpu_check.sh  # here: the same steps on the CPU, tiny sizes, float32
#   KVCORE_ONLY=21 (or 30) bash benchmarks/gpu_check.sh  # only issue 21's (or 30's) steps: one device call of at
#                                                        # most 10 minutes holds either half (8.5 and 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
LOG_DIR=${OUT:-runs}
mkdir -p "$LOG_DIR"
exec > >(tee -a "$LOG_DIR/gpu_check.log") 2>&1

if [ "${KVCORE_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu DTYPE=float32 BIG=tiny SCALE=20  # step limits x20: the shared CPU is slow
    CALIBRATION_SIZES="--batches 2 --batch-size 2 --seq-len 64 --rounds 4"
    CACHE_SIZES="--contexts 128,256 --batch-sizes 1,2 --rounds 2 --new-tokens 2"
    MEMORY_SIZES="--preset tiny --lengths 256,512"
else
    DEVICE=cuda DTYPE=bfloat16 BIG=1b SCALE=1
    CALIBRATION_SIZES="--batches 8 --batch-size 8 --seq-len 1024 --rounds 24"
    CACHE_SIZES="--contexts 4096,16384,32768 --batch-sizes 1,8 --rounds 5 --new-tokens 8"
    MEMORY_SIZES="--preset 1b --lengths 32768"
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, print its wall time, remember a failure
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo
    echo "## $name"
    echo "\$ $*"
    timeout "$((limit * SCALE))" "$@" || failed+=("$name (exit $?)")
    echo "($name: $((SECONDS - start)) s)"
}

echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $DEVICE ($DTYPE)"
if [ -d .whl ] && ! "$PYTHON" -c "import lm_eval, datasets" 2>/dev/null; then
    # No index there: the wheels of .whl/ (scripts/build_gpu_wheelhouse.sh), into the interpreter's own
    # environment, so that the .pth shim registering kvcore_hf for the plain lm_eval command runs.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || failed+=("install")
fi
"$PYTHON" - <<'EOF'
import importlib.metadata as m, platform, torch
names = ["torch", "transformers", "lm_eval", "datasets", "accelerate", "numpy", "pyarrow", "huggingface-hub"]
print("python", platform.python_version(), "|", ", ".join(f"{n} {m.version(n)}" for n in names))
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU run)")
EOF
# Conflicts that concern what was carried (the image's other packages are not ours to judge).
"$PYTHON" -m pip check 2>/dev/null | grep -iE "kvcore|lm-eval|lm_eval|datasets|transformers|openai" || echo "pip check: no conflict involving the carried packages"

ONLY=${KVCORE_ONLY:-all}
if [ "$ONLY" != 30 ]; then
step "gpu-marked tests" 150 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
step "calibration, $BIG Llama shape" 75 "$PYTHON" benchmarks/calibration.py --preset "$BIG" \
    --device "$DEVICE" --dtype "$DTYPE" $CALIBRATION_SIZES
step "calibration, SmolLM2 shape (random weights)" 75 "$PYTHON" benchmarks/calibration.py --preset smollm2 \
    --random-weights --device "$DEVICE" --dtype "$DTYPE" $CALIBRATION_SIZES
step "cache, $BIG Llama shape" 210 "$PYTHON" benchmarks/cache.py --preset "$BIG" --device "$DEVICE" --dtype "$DTYPE" \
    --ranks 0.5,0.25 $CACHE_SIZES
fi
if [ "$ONLY" != 21 ]; then
step "prefill peak memory, hf vs every kvcore_hf mode" 240 "$PYTHON" benchmarks/memory.py --device "$DEVICE" \
    --dtype "$DTYPE" $MEMORY_SIZES
step "no mask in a causal prefill; disk offload equals one device" 60 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_prefill_masks.py tests/test_offload.py
if [ "$GPUS" -ge 2 ] || [ "$DEVICE" = cpu ]; then
    # every GPU present (on the CPU: two gloo processes), against one process
    PROCESSES=$([ "$DEVICE" = cpu ] && echo 2 || echo "$GPUS")
    step "data-parallel lm-eval, $PROCESSES processes" 180 env KVCORE_DP_DEVICE="$DEVICE" \
        KVCORE_DP_PROCESSES="$PROCESSES" "$PYTHON" -m pytest -q -m slow -p no:cacheprovider tests/test_data_parallel.py
else
    echo; echo "## data-parallel lm-eval: skipped, $GPUS GPU here (it needs two or more)"
fi
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: every step finished"
else
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
