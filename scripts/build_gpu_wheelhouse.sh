#!/usr/bin/env bash
# Build .whl/ (git-ignored): the wheels that the GPU machine (Python 3.12, x86_64, torch 2.11, transformers 5.17,
# no network) lacks to run kvcore-eval: lm-eval and its dependencies, datasets, openai, transformers 5.24+ and
# kvcore-eval itself. Then check that they travel with the working tree (64 MiB per device call) and print the
# install line for that machine.
#
#   bash scripts/build_gpu_wheelhouse.sh
#
# How: build kvcore-eval's wheel; walk its requirements (scripts/gpu_wheelhouse.py), skipping what the image holds
# (unless too old: transformers), and download each wheel for CPython 3.12 manylinux x86_64 at the version this
# environment tested. Dependencies published only as source archives (sqlitedict, word2number, rouge-score: pure
# Python) are built into py3-none-any wheels here first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEST=.whl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LIMIT_MIB=64

# The GPU image's packages (the device docs' KINDS.md, as read on 2026-11-17).
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
CARRY_ANYWAY="transformers"  # on the image, but older (5.17) than kvcore-eval needs (5.24: the `cache=` argument)

if [ -e "$DEST" ] && find "$DEST" -mindepth 1 ! -name '*.whl' | grep -q .; then
    echo "$DEST holds files this script did not write; move them away first" >&2
    exit 1
fi

echo "1. kvcore-eval's wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheels" . 2>&1 | grep -v "^WARNING: Location" || true
KVCORE_WHEEL=$(ls "$WORK"/wheels/kvcore_eval-*.whl)

echo "2. pure-Python dependencies published only as source archives, built as wheels"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheels" sqlitedict==2.1.0 word2number==1.1 rouge-score==0.1.2 2>&1 \
    | grep -v "^WARNING: Location" || true

echo "3. the wheels of what the image lacks, at the versions tested here (scripts/gpu_wheelhouse.py)"
mkdir -p "$WORK/out"
cp "$KVCORE_WHEEL" "$WORK/out/"
"$PYTHON" scripts/gpu_wheelhouse.py --wheel "$KVCORE_WHEEL" --image "$IMAGE_PACKAGES" --carry "$CARRY_ANYWAY" \
    --find-links "$WORK/wheels" --dest "$WORK/out"

echo "4. replacing $DEST"
rm -f "$DEST"/*.whl
mkdir -p "$DEST"
mv "$WORK"/out/* "$DEST"/

echo
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
wheels=$(stat -c %s "$DEST"/*.whl | awk '{s += $1} END {print s + 0}')
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
shared=$(if [ -d shared ]; then find shared -type f -printf '%s\n'; fi | awk '{s += $1} END {print s + 0}')
total=$((wheels + tree + shared))
awk -v w="$wheels" -v t="$tree" -v s="$shared" -v limit="$LIMIT_MIB" 'BEGIN {
    m = 1048576; printf "wheels %.1f MiB + working tree %.1f MiB + shared/ %.1f MiB = %.1f MiB (limit %d MiB)\n",
    w / m, t / m, s / m, (w + t + s) / m, limit }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "too large to travel: drop wheels or untracked files" >&2
    exit 1
fi
echo
echo "On the GPU machine (device tool: carry [\".whl\"]), from the repository root, no index:"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl"
echo "(benchmarks/gpu_check.sh runs this line itself when lm_eval is missing)"
