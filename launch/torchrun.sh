#!/usr/bin/env bash
# One node: torchrun with defaults from the environment, then the trainer with your arguments.
#
#   launch/torchrun.sh --config configs/ms1m_r50_dsoftmax.yaml --set data.manifest=/data/ms1m/manifest.json
#   NPROC_PER_NODE=2 launch/torchrun.sh --config configs/demo.yaml      # 2 CPU ranks (gloo) on a machine without GPUs
#
# Environment (all optional):
#   NPROC_PER_NODE  ranks on this node (default: the GPUs torch sees, else 1)
#   MAX_RESTARTS    torchrun restarts after a failed worker (default 3); each restart resumes from `latest`
#   PYTHON          the interpreter with dsoft_dist installed (default: python)
# Everything after the script name goes to `python -m dsoft_dist.train` unchanged.
set -euo pipefail
python="${PYTHON:-python}"
nproc="${NPROC_PER_NODE:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  --max-restarts "${MAX_RESTARTS:-3}" -m dsoft_dist.train "$@"
