#!/usr/bin/env bash
# docker/selftest.sh: builds docker/Dockerfile and trains in the image, for real, without a Docker
# engine or a registry (buildah, podman with runc, a debootstrapped base).
#
#   docker/selftest.sh            (as root, from anywhere; it works in the repository root)
#
# 1. installs buildah, podman, runc and debootstrap with apt-get if one is missing;
# 2. the base image localhost/dsoft-base:bookworm: Debian bookworm (python 3.11) made with
#    debootstrap and imported with podman; cached: skipped when the image exists;
# 3. builds localhost/dsoft-dist:cpu with buildah (--isolation chroot, --pull=never), with the
#    host's CPU torch wheel mounted from $DSOFT_WHEELS (default /opt/wheels; pip would otherwise
#    fetch the CUDA build) and the host's pip CA bundle ($DSOFT_PIP_CERT, else $PIP_CERT, when set:
#    a TLS-intercepting proxy's CA), and checks that the image's torch is the CPU build;
# 4. container 1 trains the demo config for 20 steps on 2 local ranks into a mounted host folder,
#    checkpointing at steps 10 and 20; container 2 (a new one, the same folder) resumes from
#    step 20 and trains to step 30. Both are checked from their logs and the folder.
# Containers are removed (--rm), the images are kept (a cache for the next run), the temporary
# folders are removed on exit. One line per stage, then "docker selftest: passed".
#
# Exit codes: 0 passed, 1 failed (with the tail of the logs), 3 skipped (not root, or the tools
# or the CPU torch wheel are missing and cannot be installed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE=localhost/dsoft-base:bookworm
IMAGE=localhost/dsoft-dist:cpu
WHEELS="${DSOFT_WHEELS:-/opt/wheels}"
TORCH_WANT="2.13.0+cpu"
CONFIG=/opt/dsoft-dist/configs/demo.yaml   # where the Dockerfile copies configs/
# the default crun fails on this kernel's cgroups (v1); runc works
PODMAN_RUN=(podman --runtime runc run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
            --network host --shm-size 1g)

skip() { echo "docker selftest: skipped: $*"; exit 3; }

fail() {  # fail MESSAGE [LOG...]: the message, the logs' tails, exit 1
    local message="$1" f
    shift
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            echo "----- the last 40 lines of $(basename "$f")"
            tail -n 40 "$f"
        fi
    done
    echo "docker selftest: FAILED: $message"
    exit 1
}

TMP=""
cleanup() {
    local mnt
    [[ -n "$TMP" && -d "$TMP" ]] || return 0
    # a debootstrap that stopped half-way can leave proc/sys/dev mounted in the rootfs: unmount
    # them first (deepest first), and never let rm cross into another file system
    while read -r mnt; do
        umount -l "$mnt" 2> /dev/null || true
    done < <(awk -v p="$TMP/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r)
    rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT

step_of() {  # the largest "step" in a metrics.jsonl, or nothing
    grep -oE '"step": *[0-9]+' "$1" 2> /dev/null | grep -oE '[0-9]+$' | sort -n | tail -n 1 || true
}

# ---- 0. root and the tools
[[ "$(id -u)" -eq 0 ]] || skip "needs root (buildah, podman and debootstrap run rootful here)"
missing=()
for tool in buildah podman runc debootstrap; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    command -v apt-get > /dev/null || skip "no apt-get to install ${missing[*]}"
    echo "docker selftest: installing ${missing[*]} with apt-get"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah podman runc debootstrap; } \
        > /var/tmp/dsoft-selftest-apt.log 2>&1; then
        tail -n 20 /var/tmp/dsoft-selftest-apt.log
        skip "apt-get could not install buildah podman runc debootstrap (log: /var/tmp/dsoft-selftest-apt.log)"
    fi
fi
shopt -s nullglob
wheels=("$WHEELS"/torch-"$TORCH_WANT"-cp311-cp311-*.whl)
shopt -u nullglob
((${#wheels[@]})) || skip "no CPU torch wheel torch-$TORCH_WANT-cp311 in $WHEELS (set DSOFT_WHEELS)"

TMP="$(mktemp -d /var/tmp/dsoft-selftest.XXXXXX)"
cd "$ROOT"

# ---- 1. the base image
t0=$SECONDS
if podman image exists "$BASE_IMAGE"; then
    echo "base:        $BASE_IMAGE (cached)"
else
    # passwd: useradd for the Dockerfile's user (minbase has only the essential packages)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
        bookworm "$TMP/rootfs" > "$TMP/debootstrap.log" 2>&1 \
        || fail "debootstrap bookworm" "$TMP/debootstrap.log" "$TMP/rootfs/debootstrap/debootstrap.log"
    rm -rf "$TMP/rootfs/var/cache/apt/archives/"*.deb "$TMP/rootfs/var/lib/apt/lists/"*
    tar -C "$TMP/rootfs" -c . | podman import - "$BASE_IMAGE" > "$TMP/import.log" 2>&1 \
        || fail "podman import of the debootstrapped rootfs" "$TMP/import.log"
    rm -rf --one-file-system "$TMP/rootfs"
    echo "base:        $BASE_IMAGE (debootstrapped and imported in $((SECONDS - t0)) s)"
fi

# ---- 2. the image
# The wheels, and the host's pip CA bundle (a TLS-intercepting proxy's CA is not in the base), are
# mounted for the RUN steps only; buildah leaves their (empty) mount points in the image, hence /tmp.
# --force-rm: a failed build leaves no working container behind (--layers keeps the step cache).
build_opts=(--volume "$WHEELS:/tmp/dsoft-build/wheels:ro" --build-arg PIP_FIND_LINKS=/tmp/dsoft-build/wheels)
ca="${DSOFT_PIP_CERT:-${PIP_CERT:-}}"
if [[ -n "$ca" && -f "$ca" ]]; then
    build_opts+=(--volume "$ca:/tmp/dsoft-build/ca.crt:ro" --build-arg PIP_CERT=/tmp/dsoft-build/ca.crt)
fi
t0=$SECONDS
buildah build --pull=never --isolation chroot --layers --force-rm "${build_opts[@]}" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -f docker/Dockerfile -t "$IMAGE" . > "$TMP/build.log" 2>&1 \
    || fail "buildah build" "$TMP/build.log"
build_s=$((SECONDS - t0))
size_mb=$(($(podman image inspect --format '{{.Size}}' "$IMAGE") / 1000000))
echo "build:       $IMAGE, $size_mb MB, built in $build_s s"

torch_version=$("${PODMAN_RUN[@]}" --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)' \
    2> "$TMP/torch.log") || fail "python -c 'import torch' in the image" "$TMP/torch.log"
[[ "$torch_version" == "$TORCH_WANT" ]] || fail "the image's torch is $torch_version, not $TORCH_WANT"
echo "torch:       $torch_version in the image"

# ---- 3. train, then resume in a new container
OUT="$TMP/out"
mkdir -p "$OUT"
chown 1000:1000 "$OUT"   # the image's user (USER_UID 1000) writes there
RUN_DIR="$OUT/run"
train_args=(train --config "$CONFIG" --nproc 2 --set logging.output_dir=/workspace/out/run
            --set checkpoint.every_steps=10 --set eval.every_steps=0 --set logging.progress=false)

t0=$SECONDS
"${PODMAN_RUN[@]}" -v "$OUT:/workspace/out" "$IMAGE" "${train_args[@]}" --set schedule.steps=20 \
    > "$TMP/run1.log" 2>&1 || fail "container 1 (train to step 20)" "$TMP/run1.log"
run1_s=$((SECONDS - t0))
latest1=$(cat "$RUN_DIR/checkpoints/latest" 2> /dev/null || true)
step1=$(step_of "$RUN_DIR/metrics.jsonl")
[[ "$latest1" == "step-00000020" ]] || fail "container 1: checkpoints/latest is '$latest1', not step-00000020" "$TMP/run1.log"
[[ "$step1" == "20" ]] || fail "container 1: metrics.jsonl ends at step '$step1', not 20" "$TMP/run1.log"
if grep -q "resumed from" "$TMP/run1.log"; then
    fail "container 1 resumed, it should have started afresh" "$TMP/run1.log"
fi
echo "container 1: trained to step $step1, checkpoint $latest1 ($run1_s s)"

t0=$SECONDS
"${PODMAN_RUN[@]}" -v "$OUT:/workspace/out" "$IMAGE" "${train_args[@]}" --set schedule.steps=30 --resume auto \
    > "$TMP/run2.log" 2>&1 || fail "container 2 (resume, train to step 30)" "$TMP/run2.log"
run2_s=$((SECONDS - t0))
resumed=$(grep -oE 'resumed from [^ ]*step-00000020: step [0-9]+' "$TMP/run2.log" | head -n 1 || true)
latest2=$(cat "$RUN_DIR/checkpoints/latest" 2> /dev/null || true)
step2=$(step_of "$RUN_DIR/metrics.jsonl")
[[ -n "$resumed" ]] || fail "container 2 logged no 'resumed from .../step-00000020'" "$TMP/run2.log"
[[ "$resumed" == *": step 20" ]] || fail "container 2: '$resumed', not step 20" "$TMP/run2.log"
[[ "$latest2" == "step-00000030" ]] || fail "container 2: checkpoints/latest is '$latest2', not step-00000030" "$TMP/run2.log"
[[ "$step2" == "30" ]] || fail "container 2: metrics.jsonl ends at step '$step2', not 30" "$TMP/run2.log"
echo "container 2: $resumed; trained to step $step2, checkpoint $latest2 ($run2_s s)"

echo "docker selftest: passed"
