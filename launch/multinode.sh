#!/usr/bin/env bash
# Many nodes: run this same command on every node; the nodes meet in a c10d rendezvous on MASTER_ADDR.
#
#   # on each of 4 nodes (node 0's address is 10.0.0.1):
#   NNODES=4 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/glint360k_r100_dsoftmax.yaml
#   # elastic: start with 2..4 nodes, restart every node's workers when one fails, resume from `latest`
#   NNODES=2:4 MAX_RESTARTS=10 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config my.yaml
#
# Environment:
#   NNODES          node count, or MIN:MAX for an elastic range (required)
#   MASTER_ADDR     an address of the rendezvous host that every node can reach (required; not 127.0.0.1
#                   unless all "nodes" are on this machine). `dsoft doctor --nnodes N` checks it.
#   MASTER_PORT     the rendezvous port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE  ranks per node (default: the GPUs torch sees, else 1)
#   MAX_RESTARTS    restarts after a failed worker (default 3)
#   RDZV_ID         the job's rendezvous id, the same on every node (default: SLURM_JOB_ID, else dsoft)
#   PYTHON          the interpreter with dsoft_dist installed (default: python)
# Set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the interface the nodes share when a node has several.
# Every rendezvous round gets a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; docs/launch.md says why).
set -euo pipefail
: "${NNODES:?set NNODES to the node count (or MIN:MAX)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host that every node can reach}"
python="${PYTHON:-python}"
nproc="${NPROC_PER_NODE:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
"$python" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-dsoft}}" \
  --max-restarts "${MAX_RESTARTS:-3}" -m dsoft_dist.train "$@" &
agent=$!
# A preemption signal reaches torchrun and its workers too (Slurm signals the whole step; a terminal its
# process group): the ranks checkpoint and exit 75, torchrun then fails. This node exits 0 in that case,
# so that srun --kill-on-bad-exit does not kill another node still finishing its part of the checkpoint.
signaled=""
trap 'signaled=TERM' TERM
trap 'signaled=USR1' USR1
status=0
while true; do  # a trapped signal interrupts `wait`: wait again until torchrun has really ended
  wait "$agent" && status=0 || status=$?
  kill -0 "$agent" 2>/dev/null || break
done
if [ -n "$signaled" ]; then
  echo "multinode.sh: stopped by $signaled (torchrun exit code $status): the ranks checkpointed at a step boundary"
  exit 0
fi
exit "$status"
