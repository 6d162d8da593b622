#!/usr/bin/env bash
# Everything a lent GPU has to run, as one command (device time is scarce:
# 15 minutes per task, the machine's start included). From a session:
#
#   run(command="bash bench/gpu_session.sh", timeout_s=560)
#
# then copy what came back ($OUT/results/*.json) into bench/results/ and commit
# it. Steps are time-boxed so the run ends inside the call's limit with
# whatever it reached (ZF_GPU_BUDGET, 540 s by default, bounds the whole run;
# steps past it are skipped); each writes its log under $OUT (8 files come back at
# most: log.txt, gpu-tests.xml and up to 5 results files).
#
# ZF_GPU_STEPS picks steps (default: "build tests dev kernels attention fused_ops train zero3"),
# e.g. ZF_GPU_STEPS="build tests" for a correctness-only rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zerofuse-gpu}
mkdir -p "$OUT/results"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
STEPS=${ZF_GPU_STEPS:-build tests dev kernels attention fused_ops train zero3}
BUDGET=${ZF_GPU_BUDGET:-540}  # seconds for the whole script: inside the device tool's 600 s per call
start=$SECONDS
step() { echo; echo "== $1 (t=$((SECONDS - start)) s)"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# A step's time limit: its own box, cut to what is left of the budget (0: skip it).
limit() {
  local left=$((BUDGET - (SECONDS - start) - 10))
  if ((left < 20)); then echo 0; elif (($1 < left)); then echo "$1"; else echo "$left"; fi
}

if wants build; then
  step "build: pip install --no-build-isolation --no-deps -e . (sm_90 only: this machine's)"
  # --no-deps: the machine has no network, and torch, tqdm and matplotlib are there.
  python3 -m pip install -q --no-build-isolation --no-deps -e . \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 || { echo "BUILD FAILED"; exit 1; }
fi
python3 -m zerofuse env

# `timeout 0` would mean no limit: a spent budget skips the command instead.
bounded() {  # box (s), command...
  local box
  box=$(limit "$1")
  shift
  if ((box == 0)); then echo "skipped (the budget is spent): $*"; return 124; fi
  timeout "$box" "$@"
}

if wants tests; then
  step "tests: pytest -m gpu"
  bounded 240 python3 -m pytest -m gpu -q -rfE --junitxml="$OUT/gpu-tests.xml" -p no:cacheprovider tests/
  echo "pytest -m gpu: rc=$?"
fi

if wants dev; then
  step "dev/cuda: kernel versions, each validated against float64 before it is timed"
  cmake -S dev/cuda -B build/dev-cuda -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="$(python3 -m zerofuse cmake-prefix)" > /dev/null && cmake --build build/dev-cuda &&
    { bounded 60 build/dev-cuda/dev_layernorm_forward all; echo "dev_layernorm_forward: rc=$?";
      bounded 60 build/dev-cuda/dev_layernorm_backward all; echo "dev_layernorm_backward: rc=$?";
      bounded 60 build/dev-cuda/dev_adam all; echo "dev_adam: rc=$?"; }
fi

bench() {  # name, time limit (s), extra arguments
  local name=$1 box=$2
  shift 2
  step "bench/$name.py $*"
  bounded "$box" python3 "bench/$name.py" --out "$OUT/results" "$@"
  echo "bench/$name.py: rc=$?"
}
wants kernels && bench kernels 90
wants attention && bench attention 60
wants fused_ops && bench fused_ops 60
wants train && bench train_gpt2 150 --steps 20
# One GPU: world size 1, so this is ZeRO-3's own cost (hooks, gather/release
# into the reused buffer) against ZeRO-2 and FSDP2 on GPT-2 124M in bf16.
wants zero3 && bench zero3 90 --device cuda --world 1 --model 124m --steps 10 --warmup 3 --rounds 1

step "done"
ls -l "$OUT" "$OUT/results"
