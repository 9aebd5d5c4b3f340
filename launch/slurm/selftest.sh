#!/usr/bin/env bash
# A real Slurm cluster on this machine (munge, slurmctld, two slurmd emulating nodes n1 and n2, from the Debian
# packages slurm-wlm and munge), then launch/slurm/train.sbatch, unchanged, on 2 nodes x 1 task:
#   job 1 trains the CPU demo and must end COMPLETED with its checkpoint and metrics;
#   job 2 is preempted mid-run (the signal Slurm sends before the time limit: scancel --batch --signal=USR1),
#   must checkpoint, requeue itself, resume from that checkpoint in its second run and end COMPLETED.
# Everything lives in one scratch folder and every daemon is stopped by its PID at the end.
#
#   launch/slurm/selftest.sh                 # needs root and `apt-get install slurm-wlm munge`
#   PYTHON=.venv/bin/python KEEP=1 launch/slurm/selftest.sh   # KEEP=1 leaves the scratch folder for a look
# Exit codes: 0 passed, 1 failed, 3 skipped (no Slurm/munge binaries or not root; the reason is printed).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$(command -v python)}"
for exe in munged slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$exe" >/dev/null || { echo "slurm selftest: skipped: $exe is missing (apt-get install slurm-wlm munge)"; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "slurm selftest: skipped: the daemons run as root here, and this is uid $(id -u)"; exit 3; }

s="$(mktemp -d /tmp/dsoft-slurm.XXXXXX)"
chmod 755 "$s"  # munged needs every folder above its socket to be searchable
stop() {
  for pid_file in "$s"/slurmd-n1.pid "$s"/slurmd-n2.pid "$s"/slurmctld.pid "$s"/munged.pid; do
    if [ -f "$pid_file" ]; then kill "$(cat "$pid_file")" 2>/dev/null || true; fi
  done
  sleep 1
  if [ -n "${KEEP:-}" ]; then echo "slurm selftest: scratch folder kept: $s"; else rm -rf "$s"; fi
}
trap stop EXIT
fail() { echo "slurm selftest: FAILED: $*"; for f in "$s"/*.out "$s"/slurmctld.log; do echo "--- $f"; tail -n 40 "$f" || true; done; exit 1; }

# munge: its own socket, key and files in the scratch folder
mkdir -p "$s/munge" && chmod 755 "$s/munge"
head -c 1024 /dev/urandom > "$s/munge.key" && chmod 400 "$s/munge.key"
munged --socket="$s/munge/munge.sock" --key-file="$s/munge.key" --pid-file="$s/munged.pid" \
  --log-file="$s/munged.log" --seed-file="$s/munged.seed"

host="$(hostname -s)"
cpus=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 45 / 100 ))
mkdir -p "$s/state" "$s/spool"
# cred_expire=10: a requeued job may start again once its old credential expired (default 120 s)
cat > "$s/slurm.conf" <<EOF
ClusterName=dsoft-selftest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$s/munge/munge.sock,cred_expire=10
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool/%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd-%n.pid
SlurmctldLogFile=$s/slurmctld.log
SlurmdLogFile=$s/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16901 CPUs=$cpus RealMemory=$mem
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16902 CPUs=$cpus RealMemory=$mem
PartitionName=main Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
echo "CgroupPlugin=cgroup/v1" > "$s/cgroup.conf"
export SLURM_CONF="$s/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 100); do
  [ "$(sinfo -h -o %t 2>/dev/null | sort -u | tr -d '\n')" = "idle" ] && break
  sleep 0.2
done
[ "$(sinfo -h -o %t | sort -u | tr -d '\n')" = "idle" ] || fail "the nodes never became idle: $(sinfo -h 2>&1)"
echo "slurm selftest: cluster up: $(sinfo -h -o '%D nodes (%N), %c CPUs each, state %t')"

state() { scontrol show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_for() {  # job id, the state wanted, seconds
  local t=0
  while [ "$(state "$1")" != "$2" ]; do
    case "$(state "$1")" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) fail "job $1 ended $(state "$1")";; esac
    [ "$t" -ge "$3" ] && fail "job $1 is $(state "$1") after $3 s, not $2"
    sleep 1; t=$((t + 1))
  done
}
submit() {  # output folder name, steps, extra trainer arguments...
  local name="$1" steps="$2"; shift 2
  sbatch --parsable --nodes 2 --chdir "$s" --output "$s/$name.out" \
    --export "ALL,MASTER_ADDR=127.0.0.1,OMP_NUM_THREADS=1,PYTHON=$python" \
    "$repo/launch/slurm/train.sbatch" --config "$repo/configs/demo.yaml" --set "logging.output_dir=$s/$name" \
    --set "schedule.steps=$steps" --set checkpoint.every_steps=10 --set eval.every_steps=0 \
    --set logging.progress=false "$@"
}
latest_step() { sed 's/^step-0*//' "$s/$1/checkpoints/latest" 2>/dev/null || echo none; }

# job 1: train on 2 nodes, end COMPLETED with a checkpoint and metrics
job1="$(submit run1 30)"
wait_for "$job1" COMPLETED 900
[ "$(latest_step run1)" = 30 ] || fail "job $job1: latest checkpoint is step $(latest_step run1), not 30"
grep -q '"step": 30' "$s/run1/metrics.jsonl" || fail "job $job1: metrics.jsonl has no step 30"
grep -q "on 2 nodes" "$s/run1.out" || fail "job $job1 did not run on 2 nodes"
echo "slurm selftest: job $job1 COMPLETED on 2 nodes: checkpoint step $(latest_step run1), metrics to step 30"

# job 2: preempted mid-run, requeued by itself, resumed from its checkpoint, COMPLETED
job2="$(submit run2 200)"
for _ in $(seq 900); do
  [ "$(latest_step run2)" != none ] && [ "$(latest_step run2)" -ge 20 ] && break
  sleep 1
done
[ "$(latest_step run2)" != none ] || fail "job $job2 never wrote a checkpoint"
scancel --batch --signal=USR1 "$job2"  # what --signal=B:USR1@180 sends before the time limit
for _ in $(seq 300); do
  grep -q "restart 1" "$s/run2.out" 2>/dev/null && break
  sleep 1
done
grep -q "restart 1" "$s/run2.out" || fail "job $job2 was not requeued (no second run in its log)"
wait_for "$job2" COMPLETED 900
resumed="$(grep -m 1 -o 'resumed from [^ ]*: step [0-9]*' "$s/run2.out")" || fail "job $job2's second run did not resume"
[ "$(latest_step run2)" = 200 ] || fail "job $job2: latest checkpoint is step $(latest_step run2), not 200"
echo "slurm selftest: job $job2 preempted: $(grep -m 1 -o 'preempted (SIGTERM) after step [0-9]*' "$s/run2.out" || true);" \
     "requeued (SLURM_RESTART_COUNT=1); $resumed; COMPLETED at step $(latest_step run2)"
echo "slurm selftest: passed"
