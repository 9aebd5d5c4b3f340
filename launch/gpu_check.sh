#!/usr/bin/env bash
# GPU validation of the head's triton backend and the trainer: GPU tests + kernel benchmark + a short
# `dsoft train` on one GPU (nccl, bf16, the head's triton backend), report in OUT_DIR.
#
#   launch/gpu_check.sh OUT_DIR     # from anywhere; one CUDA GPU; < 9 minutes (stage limits sum to 540 s)
#
# Writes OUT_DIR/report.md (GPU, date, versions, test results, every figure, targets met or not),
# OUT_DIR/kernels.json (the benchmark), head.log (the whole head step on the torch chunked path, fp32),
# backbone.log + backbone.json (ViT-B's training step, activation checkpointing off and on),
# nvidia-smi.txt, versions.txt, pytest-*.log/xml, compile-check.log, train.log + train/ (the run's outputs),
# speedup.log + speedup/ (`dsoft bench speedup` at C = 1M and 4M), plan-profile.json (the GPU's profile for
# `dsoft plan --profile`, measured at docs/scale.md's sizes) + plan.log.
# Every stage has a `timeout` so the whole check ends in under ~9 minutes; a stage that fails or
# times out is recorded in the report and the next stage still runs. Sizes are fixed below.
# Python: $PYTHON if set, else `python3`. If that cannot import dsoft_dist.kernels + triton + pytest,
# a venv is made in $DSOFT_GPU_VENV (default ~/.cache/dsoft_dist/venv-gpu, outside the repo) with
# --system-site-packages, so the machine's CUDA torch, triton, pytest and numpy are reused, and the
# repo is installed there OFFLINE: `pip install --no-index --no-deps --no-build-isolation -e .`
# (GPU machines may reach no package index; the kernel checks need only torch, triton, numpy,
# pyyaml, pytest and pytest-timeout from the machine, not webdataset or wandb).
set -uo pipefail

OUT=${1:?usage: launch/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
START=$(date +%s)
STATUS="$OUT/stages.txt"
: > "$STATUS"

stage() {  # stage NAME SECONDS CMD... : runs CMD under timeout, logs to OUT/NAME.log, records rc
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" >&2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - START ))" >> "$STATUS"
    tail -n 5 "$OUT/$name.log" >&2
    return 0
}

if ! "$PY" -c "import torch, triton, pytest, dsoft_dist.kernels" 2>/dev/null; then
    VENV=${DSOFT_GPU_VENV:-$HOME/.cache/dsoft_dist/venv-gpu}
    echo "== making $VENV (system torch reused)" >&2
    "$PY" -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
    timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
        || echo "install rc=$? (see install.log)" >> "$STATUS"
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$STATUS"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    "$PY" - <<'PYEOF'
import sys, torch, triton
print("python:", sys.version.split()[0])
print("torch:", torch.__version__, "cuda", torch.version.cuda)
print("triton:", triton.__version__)
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PYEOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt" >&2

# 1. GPU-marked tests (compiled kernels: bf16/fp16/fp32, large shapes, tile configs, memory, head)
stage pytest-gpu 150 "$PY" -m pytest -m gpu tests/test_kernels_shard_stats.py tests/test_kernels_head.py \
    tests/test_kernels_bench.py tests/test_kernels_gpu.py -q -rA -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml"
# 2. the benchmark at the issue's sizes, tiles picked by a fixed 4-config sweep at the first size
stage bench 125 "$PY" -m dsoft_dist.bench.kernels --classes 100000 1000000 --batch 512 4096 --dim 512 \
    --dtype bf16 --sample-rate 0.015625 --repeats 5 --warmup 2 --sweep --out "$OUT/kernels.json"
# 3. register/shared-memory use of the compiled kernels (sm_90 code, this Triton version)
stage compile-check 30 "$PY" -m dsoft_dist.kernels.compile_check --arch 90 --sweep
# 4. the CPU suite's odd shapes (B=37, C=101, D=40, 2 splits), fp32, on compiled kernels (each new
#    constexpr combination compiles: the subset keeps this stage short)
stage pytest-compiled 50 "$PY" -m pytest tests/test_kernels_shard_stats.py -k "float32 and B37" \
    -q -rA -p no:cacheprovider --junitxml "$OUT/pytest-compiled.xml"

# 5. the whole head step (forward + backward + row-sparse SGD) on the torch chunked path, fp32, at the
#    head issue's sizes, with the weight gradient + step and with the step in backward
stage head 55 bash -c "\"$PY\" -m dsoft_dist.bench.head --device cuda --classes 1000000 --dim 512 --batch 512 \
    --sample-rates 1 0.125 0.015625 --repeats 5 --warmup 2 && \"$PY\" -m dsoft_dist.bench.head --device cuda \
    --classes 1000000 --dim 512 --batch 512 --sample-rates 1 0.125 0.015625 --repeats 5 --warmup 2 \
    --step-in-backward"

# 6. the trainer on one GPU: nccl, bf16 autocast, head.compute_dtype=bf16 (train.log says which head path
#    ran and the samples/s; train/report.md the verification before and after)
stage train 40 "$PY" -m dsoft_dist.train --config configs/demo.yaml --nproc 1 --set parallel.backend=nccl \
    --set parallel.precision=bf16 --set head.compute_dtype=bf16 --set data.num_workers=2 --set schedule.steps=200 \
    --set logging.log_every=50 --set logging.wandb=disabled --set "logging.output_dir=$OUT/train"

# 7. the paper's speedup table at fixed sizes: every method's whole head step and memory (speedup/ holds
#    speedup.md, .csv, .json and .png); softmax_naive is skipped where its replicated weight cannot fit
stage speedup 45 "$PY" -m dsoft_dist.cli bench speedup --device cuda --classes 1000000,4000000 --dim 512 \
    --batch 512 --rates 1/8,1/64 --repeats 3 --no-progress --out "$OUT/speedup"

# 8. the GPU's profile for `dsoft plan` (GEMM GFLOP/s at the head's shapes, exp2 passes, copy bandwidth, a
#    256-row head step) at docs/scale.md's sizes; plan.log has the plans with predicted times (communication
#    needs --intra-gbps / --inter-gbps: a GPU profile has no GPU-to-GPU figure, so the gloo part is skipped)
stage plan 20 "$PY" -m dsoft_dist.cli plan --classes 1000000,10000000,100000000 --gpus 8,64,512 --dim 512 \
    --batch-per-gpu 128 --dtype bf16 --sample-rate 1,1/64 --device cuda --no-collective \
    --measure-profile "$OUT/plan-profile.json"

# 9. a backbone's whole forward + backward at a training batch: ViT-B (arcface_torch's vit_b), bf16 autocast,
#    activation checkpointing off and on, side by side
stage backbone 25 "$PY" -m dsoft_dist.cli bench backbone --models vit_b --device cuda --batch 128 --dtype bf16 \
    --steps 5 --repeats 3 --json "$OUT/backbone.json"

"$PY" -m dsoft_dist.bench.kernels_report "$OUT" > "$OUT/report.md" 2> "$OUT/report.log" \
    || echo "report generation failed (see report.log)" >> "$STATUS"
echo "total seconds: $(( $(date +%s) - START ))" >> "$STATUS"
cat "$STATUS" >&2
echo "report: $OUT/report.md" >&2
