#!/usr/bin/env bash
# The accelerator checks of issue #14 as one prepared run, for a session lent a GPU machine for
# minutes: the kernels' TPU/GPU lowering tests, experiment 04 (every Pallas kernel compiled and
# timed against its XLA reference, flash attention against cuDNN, paged and MLA decode as a
# share of HBM bandwidth), the kernels' tile sweep (gpu_tune.py), and experiments 07 and 09.
# About 9 minutes on an H200, compiling included. Each step has its own time limit, so one
# hang cannot eat the others; logs and result files go to $OUT (default /tmp/gpu_check).
#
#     bash experiments/gpu_check.sh            # from the repository root
#
# The GPU machine's image has jax, flax, optax, orbax, chex and torch but not grain or
# tensorboardX: put their wheels (built for its Python) in .whl/ and they are installed first.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# jax and torch share the GPU in experiment 09: no preallocation of 75% of it by jax.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG=$OUT/log.txt

step() {  # step SECONDS NAME COMMAND...: runs one check under its limit, logging its outcome
  local limit=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

step 30 environment bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  python3 -c "import jax, flax, optax, torch; print(\"jax\", jax.__version__, \"flax\", flax.__version__,
  \"optax\", optax.__version__, \"torch\", torch.__version__, jax.devices())"'
step 60 lowering env JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -p no:cacheprovider tests/test_kernels_lowering.py
step 240 "04 kernels" python3 experiments/04_kernels.py --repeats 20 --out "$OUT/04_kernels.md"
step 240 "tile sweep" python3 experiments/gpu_tune.py --repeats 10 --budget 45 --out "$OUT/gpu_tune.md"
# 07 and 09 write into experiments/results/: remove the committed (CPU) files first, so a failed
# run cannot hand one back as the GPU's.
rm -f experiments/results/07_memory_decode.md experiments/results/09_serving_throughput.md
step 70 "07 memory decode" python3 experiments/07_memory_decode.py
cp experiments/results/07_memory_decode.md "$OUT/" 2>/dev/null
step 170 "09 serving" python3 experiments/09_serving_throughput.py --single 2
cp experiments/results/09_serving_throughput.md "$OUT/" 2>/dev/null
echo "=== done ($(date -u +%T))" | tee -a "$LOG"
